//! Property tests of every parser a user's bytes reach: the job spec, upload file names,
//! safetensors and GGUF headers, tokenizer.json, and JSONL/CSV/text datasets. Each runs a fixed
//! number of generated cases in `cargo test` (stable, no fuzzing engine) and asserts no panic and
//! a clean error: one line, naming the problem, no source paths or backtraces.
//!
//! Bytes are fed in generated chunk splits, as uploads stream them.

use compressd::inputs::gguf::GgufInspector;
use compressd::inputs::model::check_file_name;
use compressd::inputs::safetensors::SafetensorsInspector;
use compressd::inputs::{
    DatasetFormat, DatasetInspector, DatasetOptions, ModelInspector, Rejection,
};
use proptest::prelude::*;
use serde_json::{json, Value};

/// Cases per property in every `cargo test`: enough to walk each parser's branches, cheap
/// enough for every run. CI's fuzzing step (`.ci/run`) asks for many more through
/// [`CASES_ENV`], under a time limit.
const CASES: u32 = 256;
/// Environment variable overriding [`CASES`].
const CASES_ENV: &str = "COMPRESSD_FUZZ_CASES";

fn config() -> ProptestConfig {
    let cases = std::env::var(CASES_ENV)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(CASES);
    // The count, for the CI log (a property that returns has passed every case).
    eprintln!("fuzz: {cases} generated cases per property");
    ProptestConfig {
        cases,
        // No regression files in the source tree; a failure prints its minimal input.
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// A clean error says what is wrong in one line, and nothing of where the server's code is.
fn assert_clean(rejection: &Rejection) {
    let text = rejection.to_string();
    assert!(!text.is_empty() && !rejection.slug.is_empty());
    assert!(!text.contains('\n'), "multi-line error: {text}");
    for leak in [
        ".rs:",
        "backtrace",
        "/rustc/",
        "/cargo/registry",
        "panicked",
    ] {
        assert!(!text.contains(leak), "error leaks `{leak}`: {text}");
    }
}

/// Arbitrary JSON, nested a few levels.
fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>()
            .prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
        ".{0,12}".prop_map(Value::from),
        prop_oneof![
            Just("finetune"),
            Just("prune"),
            Just("quantize"),
            Just("distill"),
            Just("int4"),
            Just("2:4")
        ]
        .prop_map(Value::from),
    ];
    leaf.prop_recursive(4, 32, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::from),
            prop::collection::btree_map(
                prop_oneof![
                    "[a-z_]{1,16}",
                    Just("type".to_owned()),
                    Just("pipeline".to_owned()),
                    Just("epochs".to_owned()),
                    Just("sparsity".to_owned()),
                    Just("scheme".to_owned()),
                ],
                inner,
                0..6
            )
            .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// A valid spec with one place replaced by arbitrary JSON.
fn mutated_spec() -> impl Strategy<Value = Value> {
    let paths = prop_oneof![
        Just(vec!["name"]),
        Just(vec!["model"]),
        Just(vec!["task"]),
        Just(vec!["task", "type"]),
        Just(vec!["task", "max_length"]),
        Just(vec!["pipeline"]),
        Just(vec!["pipeline", "0"]),
        Just(vec!["pipeline", "0", "epochs"]),
        Just(vec!["pipeline", "1", "sparsity"]),
        Just(vec!["pipeline", "1", "pattern"]),
        Just(vec!["pipeline", "2", "scheme"]),
        Just(vec!["pipeline", "2", "group_size"]),
        Just(vec!["acceptance"]),
        Just(vec!["seed"]),
        Just(vec!["outputs"]),
    ];
    (paths, any_json()).prop_map(|(path, value)| {
        let mut spec = json!({
            "name": "fuzz", "model": "0192f0a0-0000-7000-8000-000000000000",
            "task": {"type": "text_classification", "dataset": "0192f0a0-0000-7000-8000-000000000001"},
            "pipeline": [{"type": "finetune"}, {"type": "prune", "sparsity": 0.5}, {"type": "quantize", "scheme": "int8"}],
        });
        let (last, parent) = path.split_last().expect("paths are not empty");
        let parent = format!("/{}", parent.join("/"));
        let parent = if parent == "/" { "" } else { parent.as_str() };
        match spec.pointer_mut(parent) {
            Some(Value::Object(map)) => {
                map.insert((*last).to_owned(), value);
            }
            Some(Value::Array(items)) => {
                if let Some(item) = last.parse::<usize>().ok().and_then(|i| items.get_mut(i)) {
                    *item = value;
                }
            }
            _ => {}
        }
        spec
    })
}

/// Where to cut a byte string into upload chunks.
fn feed_in_chunks(
    bytes: &[u8],
    cuts: &[usize],
    mut feed: impl FnMut(&[u8]) -> Result<(), Rejection>,
) -> Result<(), Rejection> {
    let mut start = 0;
    let mut cuts: Vec<usize> = cuts.iter().map(|c| c % (bytes.len() + 1)).collect();
    cuts.sort_unstable();
    for cut in cuts.into_iter().chain([bytes.len()]) {
        if cut > start {
            feed(&bytes[start..cut])?;
            start = cut;
        }
    }
    Ok(())
}

/// A safetensors file: a declared header length, a (maybe mangled) JSON header, some data.
fn safetensors_file() -> impl Strategy<Value = Vec<u8>> {
    let entry = (
        prop_oneof![
            Just("F32"),
            Just("F16"),
            Just("BF16"),
            Just("I64"),
            Just("U8"),
            Just("Q4"),
            Just("")
        ],
        prop::collection::vec(0u64..70_000, 0..4),
        0u64..5_000,
        0u64..5_000,
    );
    (
        prop::collection::vec(("[a-z.]{1,12}", entry), 0..5),
        prop::option::of(any_json()),
        prop::collection::vec(any::<u8>(), 0..256),
        any::<i64>(),
        any::<bool>(),
    )
        .prop_map(|(tensors, metadata, data, len_skew, skew)| {
            let mut header = serde_json::Map::new();
            for (name, (dtype, shape, a, b)) in tensors {
                header.insert(
                    name,
                    json!({"dtype": dtype, "shape": shape, "data_offsets": [a.min(b), a.max(b)]}),
                );
            }
            if let Some(metadata) = metadata {
                header.insert("__metadata__".into(), metadata);
            }
            let header = Value::Object(header).to_string().into_bytes();
            let mut len = header.len() as u64;
            if skew {
                len = len.wrapping_add(len_skew as u64);
            }
            let mut file = len.to_le_bytes().to_vec();
            file.extend_from_slice(&header);
            file.extend_from_slice(&data);
            file
        })
}

/// A GGUF file: magic, a version, counts and a body of typed values, often with absurd lengths.
fn gguf_file() -> impl Strategy<Value = Vec<u8>> {
    (
        prop_oneof![Just(1u32), Just(2u32), Just(3u32), any::<u32>()],
        prop_oneof![0u64..4, any::<u64>()],
        prop_oneof![0u64..4, any::<u64>()],
        prop::collection::vec(
            prop_oneof![
                // A string: a length (sometimes huge) and bytes.
                (prop_oneof![0u64..16, any::<u64>()], "[a-z.]{0,16}").prop_map(|(len, s)| {
                    let mut out = len.to_le_bytes().to_vec();
                    out.extend_from_slice(s.as_bytes());
                    out
                }),
                // A value type tag or a count.
                (0u32..14).prop_map(|t| t.to_le_bytes().to_vec()),
                any::<u64>().prop_map(|n| n.to_le_bytes().to_vec()),
                prop::collection::vec(any::<u8>(), 0..32),
            ],
            0..24,
        ),
    )
        .prop_map(|(version, tensors, kvs, body)| {
            let mut file = b"GGUF".to_vec();
            file.extend_from_slice(&version.to_le_bytes());
            file.extend_from_slice(&tensors.to_le_bytes());
            file.extend_from_slice(&kvs.to_le_bytes());
            file.extend(body.into_iter().flatten());
            file
        })
}

/// Dataset bytes: lines of JSON objects, CSV rows, text, or noise.
fn dataset_bytes() -> impl Strategy<Value = Vec<u8>> {
    let line = prop_oneof![
        (any_json(), any_json())
            .prop_map(|(text, label)| json!({"text": text, "label": label}).to_string()),
        any_json().prop_map(|v| v.to_string()),
        "[a-z,\"\\r ]{0,40}",
        ".{0,40}",
        Just("text,label".to_owned()),
    ];
    prop_oneof![
        prop::collection::vec(line, 0..12).prop_map(|lines| lines.join("\n").into_bytes()),
        prop::collection::vec(any::<u8>(), 0..512),
    ]
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn job_specs_never_panic_and_point_at_fields(spec in prop_oneof![any_json(), mutated_spec()]) {
        if let Err(violations) = compressd::job_spec::accept(&spec) {
            prop_assert!(!violations.is_empty());
            for violation in violations {
                prop_assert!(violation.pointer.is_empty() || violation.pointer.starts_with('/'), "{}", violation.pointer);
                prop_assert!(!violation.message.is_empty());
                prop_assert!(!violation.message.contains(".rs:"), "{}", violation.message);
            }
        }
    }

    #[test]
    fn accepted_file_names_stay_inside_their_folder(name in prop_oneof![
        ".{0,40}",
        "[./a-z\\\\]{0,24}",
        prop::collection::vec(prop_oneof![Just(".."), Just("."), Just(""), Just("a"), Just("b.json"), Just("/")], 0..6)
            .prop_map(|parts| parts.join("/")),
    ]) {
        match check_file_name(&name) {
            Ok(()) => {
                let base = std::path::Path::new("/base");
                let joined = base.join(&name);
                prop_assert!(!name.starts_with('/'), "{name:?}");
                prop_assert!(joined.components().all(|c| !matches!(c, std::path::Component::ParentDir)), "{name:?}");
                prop_assert!(joined.starts_with(base), "{name:?}");
            }
            Err(rejection) => {
                assert_clean(&rejection);
                prop_assert_eq!(rejection.slug, "invalid-file-name");
            }
        }
    }

    #[test]
    fn safetensors_headers_are_checked_cleanly(file in safetensors_file(), noise in prop::collection::vec(any::<u8>(), 0..64), cuts in prop::collection::vec(any::<usize>(), 0..4), use_noise in any::<bool>()) {
        let bytes = if use_noise { noise } else { file };
        let mut inspector = SafetensorsInspector::new("model.safetensors");
        let result = feed_in_chunks(&bytes, &cuts, |chunk| inspector.feed(chunk)).and_then(|()| inspector.finish().map(|_| ()));
        if let Err(rejection) = result {
            assert_clean(&rejection);
        }
    }

    #[test]
    fn gguf_headers_are_checked_cleanly_in_bounded_memory(file in gguf_file(), cuts in prop::collection::vec(any::<usize>(), 0..4)) {
        let mut inspector = GgufInspector::new("model.gguf");
        let result = feed_in_chunks(&file, &cuts, |chunk| inspector.feed(chunk)).and_then(|()| inspector.finish().map(|_| ()));
        if let Err(rejection) = result {
            assert_clean(&rejection);
        }
    }

    #[test]
    fn tokenizer_files_are_checked_cleanly(tokenizer in prop_oneof![
        any_json().prop_map(|v| v.to_string().into_bytes()),
        any_json().prop_map(|v| json!({"version": "1.0", "model": {"type": "WordPiece", "vocab": v}}).to_string().into_bytes()),
        prop::collection::vec(any::<u8>(), 0..128),
    ]) {
        let mut inspector = ModelInspector::new();
        let result = inspector.start_file("tokenizer.json")
            .and_then(|()| inspector.feed(&tokenizer))
            .and_then(|()| inspector.end_file().map(|_| ()));
        if let Err(rejection) = result {
            assert_clean(&rejection);
        }
    }

    #[test]
    fn datasets_are_checked_cleanly(bytes in dataset_bytes(), format in prop_oneof![Just(DatasetFormat::Jsonl), Just(DatasetFormat::Csv), Just(DatasetFormat::Text)], strict in any::<bool>(), cuts in prop::collection::vec(any::<usize>(), 0..4)) {
        let mut options = DatasetOptions::new(format);
        options.strict = strict;
        let mut inspector = DatasetInspector::new(options);
        let result = feed_in_chunks(&bytes, &cuts, |chunk| inspector.feed(chunk)).and_then(|()| inspector.finish().map(|_| ()));
        if let Err(rejection) = result {
            assert_clean(&rejection);
        }
    }
}

/// The inputs that broke parsers elsewhere: GGUF strings and arrays claiming more bytes than any
/// machine has, which a reader that allocates the declared length first dies on.
#[test]
fn gguf_lengths_past_the_file_are_refused_without_allocating_them() {
    for body in [
        // One key whose length is 2^40.
        [(1u64 << 40).to_le_bytes().as_slice()].concat(),
        // A key "a", an array of u8 with 2^50 items.
        [
            1u64.to_le_bytes().as_slice(),
            b"a",
            9u32.to_le_bytes().as_slice(),
            0u32.to_le_bytes().as_slice(),
            (1u64 << 50).to_le_bytes().as_slice(),
        ]
        .concat(),
        // A key "a", a string value of length u64::MAX.
        [
            1u64.to_le_bytes().as_slice(),
            b"a",
            8u32.to_le_bytes().as_slice(),
            u64::MAX.to_le_bytes().as_slice(),
        ]
        .concat(),
    ] {
        let mut file = b"GGUF".to_vec();
        file.extend_from_slice(&3u32.to_le_bytes());
        file.extend_from_slice(&0u64.to_le_bytes());
        file.extend_from_slice(&1u64.to_le_bytes());
        file.extend_from_slice(&body);
        let mut inspector = GgufInspector::new("model.gguf");
        let result = inspector
            .feed(&file)
            .and_then(|()| inspector.finish().map(|_| ()));
        let rejection = result.expect_err("an impossible length is refused");
        assert_clean(&rejection);
    }
}

/// One multipart part: its field name, its `filename` (when it has one) and its bytes.
type Part = (String, Option<String>, Vec<u8>);

/// A part of a model or dataset upload: known and unknown field names, file names that try to
/// leave their folder or break the header, and contents from real-looking to noise.
fn upload_part() -> impl Strategy<Value = Part> {
    let field = prop_oneof![
        Just("file".to_owned()),
        Just("name".to_owned()),
        Just("format".to_owned()),
        Just("strict".to_owned()),
        "[a-z_\"]{0,10}",
    ];
    let file_name = prop::option::of(prop_oneof![
        Just("config.json".to_owned()),
        Just("model.safetensors".to_owned()),
        Just("tokenizer.json".to_owned()),
        Just("data.jsonl".to_owned()),
        Just("data.csv".to_owned()),
        prop::collection::vec(
            prop_oneof![
                Just(".."),
                Just("."),
                Just(""),
                Just("a"),
                Just("b.json"),
                Just("/"),
                Just("\\"),
                Just("%2e%2e"),
                Just("\r\n"),
                Just("\""),
            ],
            0..6
        )
        .prop_map(|parts| parts.join("/")),
        ".{0,24}",
    ]);
    let bytes = prop_oneof![
        Just(valid_rows()),
        safetensors_file(),
        dataset_bytes(),
        any_json().prop_map(|v| v.to_string().into_bytes()),
        prop::collection::vec(any::<u8>(), 0..128),
    ];
    (field, file_name, bytes)
}

/// Twenty JSONL rows a dataset accepts (and a model refuses): `{"text": "row i", "label": …}`.
fn valid_rows() -> Vec<u8> {
    (0..20)
        .map(|i| {
            format!(
                "{{\"text\": \"row {i}\", \"label\": \"{}\"}}\n",
                ["a", "b"][i % 2]
            )
        })
        .collect::<String>()
        .into_bytes()
}

/// A multipart body of `parts` under `boundary`, cut short at `cut` (a fraction) when given.
fn multipart_body(boundary: &str, parts: &[Part], cut: Option<f64>) -> Vec<u8> {
    let mut body = Vec::new();
    for (field, file_name, bytes) in parts {
        body.extend_from_slice(format!("--{boundary}\r\n").as_bytes());
        let mut disposition = format!("Content-Disposition: form-data; name=\"{field}\"");
        if let Some(file_name) = file_name {
            disposition.push_str(&format!("; filename=\"{file_name}\""));
        }
        body.extend_from_slice(disposition.as_bytes());
        body.extend_from_slice(b"\r\n\r\n");
        body.extend_from_slice(bytes);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    if let Some(cut) = cut {
        body.truncate((body.len() as f64 * cut) as usize);
    }
    body
}

/// Multipart uploads to the real model and dataset routes: whatever the parts, names and
/// breaks, the answer is a success or a clean 4xx problem (never a 5xx, never a leak of where
/// the server keeps things), and nothing lands outside the artifact folder.
#[test]
fn multipart_uploads_answer_cleanly_and_stay_inside_their_folder() {
    use crate::common::api::TestApi;
    use axum::http::Method;
    use proptest::test_runner::TestRunner;

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (api, _store_dir) = runtime.block_on(TestApi::sqlite());
    let dir = &api.data_dir;
    let data_dir = dir.path().display().to_string();
    // Each case is a whole HTTP request: a quarter of the cases of the parser properties.
    let base = config();
    let mut runner = TestRunner::new(ProptestConfig {
        cases: (base.cases / 4).max(32),
        ..base
    });
    let strategy = (
        prop_oneof![Just("/v1/models"), Just("/v1/datasets")],
        prop::collection::vec(upload_part(), 0..5),
        prop_oneof![Just("bNd".to_owned()), "[a-zA-Z0-9'()+_,./:=? -]{1,70}"],
        prop::option::of(0.0f64..1.0),
    );
    let accepted = std::cell::Cell::new(0u32);
    let answers = std::cell::RefCell::new(std::collections::BTreeMap::<String, u32>::new());
    runner
        .run(&strategy, |(route, parts, boundary, cut)| {
            let body = multipart_body(&boundary, &parts, cut);
            let content_type = format!("multipart/form-data; boundary=\"{boundary}\"");
            let reply = runtime.block_on(api.send(
                Method::POST,
                route,
                &[("content-type", &content_type)],
                body,
            ));
            let status = reply.status.as_u16();
            let slug = reply.body["type"]
                .as_str()
                .unwrap_or_default()
                .rsplit(':')
                .next()
                .unwrap_or_default()
                .to_owned();
            *answers
                .borrow_mut()
                .entry(format!("{status} {slug}"))
                .or_default() += 1;
            prop_assert!(
                status == 201 || (400..500).contains(&status),
                "{route} answered {status}: {}",
                reply.body
            );
            if status == 201 {
                accepted.set(accepted.get() + 1);
                // A model's files are named by their paths in its folder: none leaves it.
                for file in reply.body["files"].as_array().into_iter().flatten() {
                    let name = file["name"]
                        .as_str()
                        .or(file["path"].as_str())
                        .unwrap_or_default();
                    let path = std::path::Path::new(name);
                    prop_assert!(
                        path.is_relative()
                            && path
                                .components()
                                .all(|c| matches!(c, std::path::Component::Normal(_))),
                        "{}",
                        reply.body
                    );
                }
            } else {
                prop_assert_eq!(reply.content_type(), "application/problem+json");
                let detail = reply.body["detail"].as_str().unwrap_or_default().to_owned();
                for leak in [
                    data_dir.as_str(),
                    ".rs:",
                    "backtrace",
                    "/rustc/",
                    "panicked",
                ] {
                    prop_assert!(!detail.contains(leak), "leaks `{}`: {}", leak, detail);
                }
            }
            Ok(())
        })
        .unwrap();
    // Nothing was written outside the artifact folder: every file under the data folder is
    // under `artifacts/` (the database of this API lives elsewhere).
    for entry in walk(dir.path()) {
        let relative = entry.strip_prefix(dir.path()).unwrap();
        let first = relative.components().next().unwrap().as_os_str();
        assert!(first == "artifacts", "{}", relative.display());
    }
    eprintln!(
        "fuzz: multipart uploads, {} accepted; answers: {:?}",
        accepted.get(),
        answers.borrow()
    );
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files.extend(walk(&path));
        } else {
            files.push(path);
        }
    }
    files
}

/// The fuzzer's minimal 500 (CI, seventeenth session): a model upload whose first file is named
/// `A:` (the store's local backend failed on names ending in a colon) and whose second `file`
/// part has no filename. The name is refused before anything is written.
#[tokio::test]
async fn a_model_upload_with_a_nameless_second_file_is_a_clean_4xx() {
    use crate::common::api::TestApi;
    use axum::http::Method;

    let (api, _store_dir) = TestApi::sqlite().await;
    let rows = valid_rows();
    let parts: Vec<Part> = vec![
        ("file".to_owned(), Some("A:".to_owned()), rows.clone()),
        ("file".to_owned(), None, rows),
    ];
    let body = multipart_body("bNd", &parts, None);
    let reply = api
        .send(
            Method::POST,
            "/v1/models",
            &[("content-type", "multipart/form-data; boundary=\"bNd\"")],
            body,
        )
        .await;
    assert_eq!(reply.status.as_u16(), 422, "{}", reply.body);
    assert!(
        reply.body["type"]
            .as_str()
            .is_some_and(|t| t.ends_with(":invalid-file-name")),
        "{}",
        reply.body
    );
}
