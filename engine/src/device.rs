//! Device selection from a user's string: `cpu`, `cuda`, `cuda:N` or `auto`.

use candle_core::Device;

use crate::error::{EngineError, Result};

/// Parses a device name into a candle [`Device`].
///
/// `auto` picks CUDA device 0 when the binary has the `cuda` feature and a GPU answers, else the CPU.
///
/// # Errors
/// Fails on an unknown name, a bad ordinal, a CUDA name in a binary built without the `cuda` feature,
/// or a CUDA device that cannot be opened.
pub fn parse_device(name: &str) -> Result<Device> {
    let name = name.trim().to_ascii_lowercase();
    match name.as_str() {
        "cpu" => Ok(Device::Cpu),
        "auto" => Ok(auto_device()),
        "cuda" | "gpu" => cuda_device(0),
        other => match other.strip_prefix("cuda:") {
            Some(ordinal) => {
                let ordinal = ordinal.parse::<usize>().map_err(|_| {
                    EngineError::InvalidSetting(format!(
                        "device {other:?}: the CUDA ordinal must be a number"
                    ))
                })?;
                cuda_device(ordinal)
            }
            None => Err(EngineError::InvalidSetting(format!(
                "unknown device {other:?}: expected cpu, cuda, cuda:N or auto"
            ))),
        },
    }
}

/// A short, stable name for a device, as accepted by [`parse_device`].
pub fn device_name(device: &Device) -> String {
    match device.location() {
        candle_core::DeviceLocation::Cpu => "cpu".to_string(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

fn auto_device() -> Device {
    if cfg!(feature = "cuda") {
        if let Ok(device) = Device::new_cuda(0) {
            return device;
        }
    }
    Device::Cpu
}

fn cuda_device(ordinal: usize) -> Result<Device> {
    if !cfg!(feature = "cuda") {
        return Err(EngineError::Unsupported(format!(
            "device cuda:{ordinal} requested, but this binary was built without the `cuda` feature"
        )));
    }
    Device::new_cuda(ordinal)
        .map_err(|e| EngineError::InvalidSetting(format!("cannot open cuda:{ordinal}: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_cpu_and_auto_and_rejects_junk() {
        assert!(parse_device("cpu").unwrap().is_cpu());
        assert!(parse_device(" CPU ").unwrap().is_cpu());
        let auto = parse_device("auto").unwrap();
        assert!(auto.is_cpu() || auto.is_cuda());
        assert!(matches!(
            parse_device("tpu"),
            Err(EngineError::InvalidSetting(_))
        ));
        assert!(parse_device("cuda:x").is_err());
        assert_eq!(device_name(&Device::Cpu), "cpu");
    }

    /// With the feature, a CUDA name either opens a device or fails with an error naming it (no GPU,
    /// no driver, or an ordinal the machine lacks) — never a panic.
    #[cfg(feature = "cuda")]
    #[test]
    fn cuda_with_feature_opens_or_names_the_device() {
        match parse_device("cuda:0") {
            Ok(dev) => {
                assert!(dev.is_cuda());
                assert_eq!(device_name(&dev), "cuda:0");
            }
            Err(err) => {
                assert!(matches!(err, EngineError::InvalidSetting(_)), "{err}");
                assert!(err.to_string().contains("cuda:0"), "{err}");
            }
        }
        let err = parse_device("cuda:999").unwrap_err();
        assert!(err.to_string().contains("cuda:999"), "{err}");
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn cuda_without_feature_is_a_clear_error() {
        let err = parse_device("cuda:1").unwrap_err();
        assert!(matches!(err, EngineError::Unsupported(_)));
        assert!(err.to_string().contains("cuda` feature"), "{err}");
    }
}
