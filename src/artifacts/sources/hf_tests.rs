//! Unit tests of `hf://` parsing, the configuration's fallbacks and the Hub's error answers;
//! downloads against a mock Hub are in `tests/api/models_hf.rs`.

use super::*;

#[test]
fn references_parse_with_kind_revision_and_path() {
    let plain = parse("hf://org/name").unwrap();
    assert_eq!(
        plain,
        HfReference {
            dataset_repo: false,
            repo_id: "org/name".into(),
            revision: "main".into(),
            path: None,
        }
    );
    assert_eq!(plain.shown(), "hf://org/name@main");
    assert_eq!(parse("hf://org/name@v2").unwrap().default_name(), "name");
    let full = parse("hf://datasets/org/news@refs%2Fpr%2F1/data/train.jsonl").unwrap();
    assert!(full.dataset_repo);
    assert_eq!(full.revision, "refs/pr/1");
    assert_eq!(full.path.as_deref(), Some("data/train.jsonl"));
    assert_eq!(full.default_name(), "train.jsonl");
    let model = parse("hf://models/org/m@v1.0/").unwrap();
    assert!(!model.dataset_repo);
    assert_eq!((model.revision.as_str(), model.path), ("v1.0", None));
}

#[test]
fn malformed_references_are_refused_with_invalid_uri() {
    for uri in [
        "hf://",
        "hf://org",
        "hf://spaces/org/app",
        "hf://org/na me",
        "hf://../name",
        "hf://org/name@",
        "hf://org/name@a/../b",
        "hf://org/name/../../etc/passwd",
        "hf://org/name/a\\b",
    ] {
        let err = parse(uri).expect_err(uri);
        assert_eq!(err.slug, "invalid-uri", "{uri}: {err}");
    }
}

fn slug_of(error: Error) -> String {
    match error {
        Error::Rejected(r) => r.slug.to_owned(),
        Error::Upstream(_) => "upstream".to_owned(),
        other => format!("{other:?}"),
    }
}

#[test]
fn hub_errors_split_into_client_mistakes_and_upstream_failures() {
    let case = |status, code| slug_of(listing_error(status, code, "hf://o/m@main", false));
    assert_eq!(case(401, "RepoNotFound"), "uri-not-found");
    assert_eq!(case(404, ""), "uri-not-found");
    assert_eq!(case(404, "RevisionNotFound"), "uri-not-found");
    assert_eq!(case(403, "GatedRepo"), "uri-not-allowed");
    assert_eq!(case(403, ""), "uri-not-allowed");
    assert_eq!(case(500, ""), "upstream");
    assert_eq!(case(429, ""), "upstream");
}

#[tokio::test]
async fn offline_resolution_reads_the_cache_layout() {
    let dir = tempfile::tempdir().unwrap();
    let repo_dir = dir.path().join("models--org--m");
    let snapshot = repo_dir.join("snapshots/abc123");
    std::fs::create_dir_all(snapshot.join("sub")).unwrap();
    std::fs::create_dir_all(repo_dir.join("refs")).unwrap();
    std::fs::write(repo_dir.join("refs/main"), "abc123\n").unwrap();
    std::fs::write(snapshot.join("config.json"), "{}").unwrap();
    std::fs::write(snapshot.join("sub/x.gguf"), "GGUF").unwrap();
    let config = HfConfig {
        endpoint: "http://unused.invalid".into(),
        cache_dir: dir.path().to_path_buf(),
        token: None,
        offline: true,
    };
    let (commit, files) = cached_listing(&repo_dir, "main", "hf://org/m@main", &config)
        .await
        .unwrap();
    assert_eq!(commit, "abc123");
    let paths: Vec<&str> = files.iter().map(|f| f.path.as_str()).collect();
    assert_eq!(paths, ["config.json", "sub/x.gguf"]);
    let (by_commit, _) = cached_listing(&repo_dir, "abc123", "x", &config)
        .await
        .unwrap();
    assert_eq!(by_commit, "abc123");
    let missing = cached_listing(&repo_dir, "v2", "hf://org/m@v2", &config)
        .await
        .unwrap_err();
    assert_eq!(slug_of(missing), "uri-not-cached");
}

#[test]
fn only_plain_commit_hashes_become_cache_paths() {
    assert!(is_commit("0123456789abcdef0123456789abcdef01234567"));
    for bad in ["", "../../etc", "a/b", "main\n"] {
        assert!(!is_commit(bad), "{bad:?}");
    }
}
