//! The quantized safetensors layout: written, read back, streamed from a memory map.

use std::collections::BTreeMap;

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use compressd_engine::quant::layout::{load, save, StoredTensor, METADATA_KEY};
use compressd_engine::quant::st_file::SafetensorsFile;
use compressd_engine::quant::stream::quantize_file;
use compressd_engine::quant::{quantize, QuantScheme, Quantized};

fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
    Ok((a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar()?)
}

#[test]
fn every_scheme_round_trips_through_the_file_bit_for_bit() -> Result<()> {
    let dev = Device::Cpu;
    let dir = tempfile::tempdir()?;
    let weight = Tensor::randn(0f32, 0.2, (64, 256), &dev)?;
    let bias = Tensor::randn(0f32, 0.2, 64, &dev)?;
    for scheme in [
        "int8",
        "int4-g32",
        "int4-g128",
        "nf4",
        "q8_0",
        "q4_k",
        "q6_k",
        "q4_0",
    ] {
        let scheme: QuantScheme = scheme.parse()?;
        let Quantized::Weight(q) = quantize(&weight, scheme)? else {
            panic!("{scheme} kept a 256-wide weight")
        };
        let path = dir.path().join(format!("{scheme}.safetensors"));
        let tensors = vec![
            (
                "layer.weight".to_string(),
                StoredTensor::Quantized(q.clone()),
            ),
            ("layer.bias".to_string(), StoredTensor::Dense(bias.clone())),
        ];
        save(
            &path,
            &tensors,
            &BTreeMap::from([("model".to_string(), "tiny".to_string())]),
        )?;
        let file = SafetensorsFile::open(&path)?;
        assert_eq!(file.metadata()["model"], "tiny");
        assert!(file.metadata()[METADATA_KEY].contains(&scheme.to_string()));
        assert!(
            file.entries().contains_key("layer.weight.qweight"),
            "{scheme}"
        );
        let loaded = load(&path, &dev)?;
        assert_eq!(loaded.len(), 2);
        let StoredTensor::Quantized(back) = &loaded[1].1 else {
            panic!("weight came back dense")
        };
        assert_eq!(back.scheme(), scheme);
        assert_eq!(
            max_abs_diff(&back.dequantize(&dev)?, &q.dequantize(&dev)?)?,
            0.0,
            "{scheme}"
        );
        let StoredTensor::Dense(b) = &loaded[0].1 else {
            panic!("bias came back quantized")
        };
        assert_eq!(max_abs_diff(b, &bias)?, 0.0);
        // Quantization error stays within what the scheme promises.
        let err = max_abs_diff(&q.dequantize(&dev)?, &weight)?;
        assert!(err < 0.15, "{scheme}: max error {err}");
    }
    Ok(())
}

#[test]
fn streaming_quantizes_weights_keeps_vectors_and_reports_odd_shapes() -> Result<()> {
    let dev = Device::Cpu;
    let dir = tempfile::tempdir()?;
    let input = dir.path().join("in.safetensors");
    let tensors = vec![
        (
            "a.weight".to_string(),
            StoredTensor::Dense(Tensor::randn(0f32, 1.0, (32, 64), &dev)?),
        ),
        (
            "a.bias".to_string(),
            StoredTensor::Dense(Tensor::randn(0f32, 1.0, 32, &dev)?),
        ),
        (
            "odd.weight".to_string(),
            StoredTensor::Dense(Tensor::randn(0f32, 1.0, (8, 48), &dev)?),
        ),
        (
            "h.weight".to_string(),
            StoredTensor::Dense(Tensor::randn(0f32, 1.0, (16, 64), &dev)?.to_dtype(DType::F16)?),
        ),
        (
            "skip.weight".to_string(),
            StoredTensor::Dense(Tensor::randn(0f32, 1.0, (16, 64), &dev)?),
        ),
    ];
    save(&input, &tensors, &BTreeMap::new())?;
    let output = dir.path().join("out.safetensors");
    let report = quantize_file(&input, &output, "q8_0".parse()?, |name| {
        name != "skip.weight"
    })?;
    assert_eq!(report.quantized, vec!["a.weight", "h.weight"]);
    assert_eq!(report.kept.len(), 1);
    assert_eq!(report.kept[0].0, "odd.weight");
    assert!(
        report.kept[0].1.contains("not a multiple of"),
        "{}",
        report.kept[0].1
    );
    assert!(report.output_bytes < report.input_bytes);
    let loaded = load(&output, &dev)?;
    let names: Vec<&str> = loaded.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        vec![
            "a.bias",
            "a.weight",
            "h.weight",
            "odd.weight",
            "skip.weight"
        ]
    );
    let (StoredTensor::Quantized(a), StoredTensor::Dense(_)) = (&loaded[1].1, &loaded[4].1) else {
        panic!("wrong kinds after streaming")
    };
    let StoredTensor::Dense(original) = &tensors[0].1 else {
        unreachable!()
    };
    let in_memory = match quantize(original, "q8_0".parse()?)? {
        Quantized::Weight(w) => w,
        Quantized::Kept { reason } => panic!("{reason}"),
    };
    assert_eq!(
        max_abs_diff(&a.dequantize(&dev)?, &in_memory.dequantize(&dev)?)?,
        0.0
    );
    Ok(())
}

#[test]
fn a_corrupt_file_is_an_error() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("bad.safetensors");
    std::fs::write(&path, [200u8, 0, 0, 0, 0, 0, 0, 0, b'{'])?;
    assert!(SafetensorsFile::open(&path).is_err());
    std::fs::write(&path, [1u8])?;
    assert!(SafetensorsFile::open(&path).is_err());
    Ok(())
}
