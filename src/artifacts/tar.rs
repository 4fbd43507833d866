//! A streaming `.tar` (POSIX ustar) of several stored objects, so a model artifact folder can be
//! downloaded as one file without building the archive anywhere: each member is a 512-byte
//! header, the object's bytes read from the store, and zero padding to the next 512 bytes.

use bytes::Bytes;
use futures::stream::{self, BoxStream, StreamExt};

use super::ArtifactStore;
use crate::error::Result;
use crate::inputs::Rejection;

const BLOCK: u64 = 512;

/// One member: its path inside the archive, the store key and the size.
#[derive(Debug, Clone)]
pub struct TarMember {
    pub path: String,
    pub key: String,
    pub bytes: u64,
}

/// Exact byte length of the archive of `members`, known before streaming (for `Content-Length`).
pub fn tar_len(members: &[TarMember]) -> u64 {
    members
        .iter()
        .map(|m| BLOCK + m.bytes.div_ceil(BLOCK) * BLOCK)
        .sum::<u64>()
        + 2 * BLOCK
}

/// Streams the archive of `members`, reading each object from `store` in turn.
///
/// # Errors
/// A rejection when a member path does not fit a ustar header (over 255 bytes).
pub fn tar_stream(
    store: ArtifactStore,
    members: Vec<TarMember>,
) -> Result<BoxStream<'static, Result<Bytes>>> {
    let headers = members
        .iter()
        .map(header)
        .collect::<std::result::Result<Vec<_>, _>>()?;
    let parts = members
        .into_iter()
        .zip(headers)
        .map(move |(member, header)| {
            let store = store.clone();
            let padding = (member.bytes.div_ceil(BLOCK) * BLOCK - member.bytes) as usize;
            let body = stream::once(async move { store.read(&member.key, None).await }).flat_map(
                |opened| match opened {
                    Ok(body) => body,
                    Err(error) => stream::once(async move { Err(error) }).boxed(),
                },
            );
            stream::once(async move { Ok(Bytes::from(header)) })
                .chain(body)
                .chain(stream::once(
                    async move { Ok(Bytes::from(vec![0u8; padding])) },
                ))
        });
    let end = stream::once(async { Ok(Bytes::from(vec![0u8; 2 * BLOCK as usize])) });
    Ok(stream::iter(parts).flatten().chain(end).boxed())
}

/// The ustar header of one regular file (mode 0644, owner 0, time 0 so archives are reproducible).
fn header(member: &TarMember) -> std::result::Result<Vec<u8>, Rejection> {
    let mut h = vec![0u8; BLOCK as usize];
    let path = member.path.as_bytes();
    let (prefix, name) = if path.len() <= 100 {
        (&b""[..], path)
    } else {
        // Split at a '/' so the name fits 100 bytes and the prefix 155.
        let split = member.path[..path.len().min(156)]
            .rfind('/')
            .filter(|&i| path.len() - i - 1 <= 100);
        let Some(i) = split else {
            return Err(Rejection::new(
                "name-too-long",
                format!("'{}' is too long for a tar member", member.path),
            ));
        };
        (&path[..i], &path[i + 1..])
    };
    h[..name.len()].copy_from_slice(name);
    octal(&mut h[100..108], 0o644);
    octal(&mut h[108..116], 0);
    octal(&mut h[116..124], 0);
    octal(&mut h[124..136], member.bytes);
    octal(&mut h[136..148], 0);
    h[156] = b'0';
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    h[345..345 + prefix.len()].copy_from_slice(prefix);
    // The checksum is computed with its own field read as eight spaces.
    h[148..156].copy_from_slice(b"        ");
    let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
    octal(&mut h[148..155], u64::from(sum));
    Ok(h)
}

/// Writes `value` as zero-padded octal digits followed by a NUL, filling `field`.
fn octal(field: &mut [u8], value: u64) {
    let digits = field.len() - 1;
    let text = format!("{value:0digits$o}");
    field[..digits].copy_from_slice(&text.as_bytes()[text.len() - digits..]);
    field[digits] = 0;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::artifacts::{S3Config, StoreConfig, MIN_PART_SIZE};
    use futures::TryStreamExt;

    #[tokio::test]
    async fn archives_read_back_with_the_system_tar() {
        let dir = tempfile::tempdir().unwrap();
        let store = ArtifactStore::open(&StoreConfig {
            url: Some("memory://".into()),
            default_dir: dir.path().into(),
            s3: S3Config::default(),
            part_size_bytes: MIN_PART_SIZE,
            max_inflight_parts: 1,
        })
        .unwrap();
        store
            .put_small("jobs/j/a", Bytes::from_static(b"hello"))
            .await
            .unwrap();
        store
            .put_small("jobs/j/b", Bytes::from(vec![7u8; 1000]))
            .await
            .unwrap();
        let long = format!("{}/config.json", "d".repeat(120));
        let members = vec![
            TarMember {
                path: "model/a.txt".into(),
                key: "jobs/j/a".into(),
                bytes: 5,
            },
            TarMember {
                path: long.clone(),
                key: "jobs/j/b".into(),
                bytes: 1000,
            },
        ];
        let bytes: Vec<Bytes> = tar_stream(store, members.clone())
            .unwrap()
            .try_collect()
            .await
            .unwrap();
        let archive = bytes.concat();
        assert_eq!(archive.len() as u64, tar_len(&members));
        let path = dir.path().join("a.tar");
        std::fs::write(&path, &archive).unwrap();
        let out = std::process::Command::new("tar")
            .arg("-xf")
            .arg(&path)
            .arg("-C")
            .arg(dir.path())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            std::fs::read(dir.path().join("model/a.txt")).unwrap(),
            b"hello"
        );
        assert_eq!(
            std::fs::read(dir.path().join(long)).unwrap(),
            vec![7u8; 1000]
        );
    }
}
