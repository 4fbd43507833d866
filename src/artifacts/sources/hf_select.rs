//! Which files of a Hugging Face repository an `hf://` reference brings: for a model, its
//! weights (`*.safetensors` with their index, or one `.gguf`) with the config and tokenizer files
//! beside them — never the PyTorch, ONNX or TensorFlow copies a repository often also holds; for a
//! dataset, one `.jsonl`, `.csv` or `.txt` file. Pure functions over the repository's file list,
//! so the rules are tested without a Hub.

use crate::inputs::{DatasetFormat, Rejection};

/// Small files a model folder may carry besides its weights; all are stored, the checked ones
/// (`config.json`, `tokenizer.json`) are validated.
const MODEL_EXTRAS: &[&str] = &[
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "added_tokens.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
];

/// Data files named in a "name one" message; a repository can hold thousands.
const LISTED: usize = 5;

/// One file of a repository, as the Hub or the local cache lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RepoFile {
    /// `/`-separated path inside the repository.
    pub path: String,
    /// Bytes, when the listing says.
    pub size: Option<u64>,
}

/// A file to fetch: where it is in the repository and what it is called in the input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selected {
    /// Path inside the repository.
    pub path: String,
    /// Path inside the registered model folder (or the dataset's file name).
    pub name: String,
    /// Bytes, when the listing says.
    pub size: Option<u64>,
}

/// What a reference is being registered as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InputKind {
    Model,
    Dataset,
}

fn refuse(slug: &'static str, message: String) -> Rejection {
    Rejection::new(slug, message)
}

/// Picks the files `path` (a file or folder in the repository, or the root) brings as `kind`.
/// `shown` is the reference as the client wrote it, for messages.
///
/// # Errors
/// `uri-not-found` when `path` is neither a file nor a folder of the repository; `invalid-model`
/// or `invalid-dataset` when the place holds no usable weights or data file, or several and the
/// client must name one.
pub fn select(
    files: &[RepoFile],
    path: Option<&str>,
    kind: InputKind,
    shown: &str,
) -> Result<Vec<Selected>, Rejection> {
    let path = path.map(|p| p.trim_matches('/')).filter(|p| !p.is_empty());
    if let Some(file) = path.and_then(|p| files.iter().find(|f| f.path == p)) {
        return match kind {
            InputKind::Model => model_from_file(files, file, shown),
            InputKind::Dataset => Ok(vec![selected(file, "")]),
        };
    }
    let folder = path.map(|p| format!("{p}/")).unwrap_or_default();
    if !folder.is_empty() && !files.iter().any(|f| f.path.starts_with(&folder)) {
        return Err(refuse(
            "uri-not-found",
            format!("{shown}: the repository has no file or folder `{folder}`"),
        ));
    }
    match kind {
        InputKind::Model => model_from_folder(files, &folder, shown),
        InputKind::Dataset => dataset_from_folder(files, &folder, shown),
    }
}

/// `file` with its name taken relative to `folder`.
fn selected(file: &RepoFile, folder: &str) -> Selected {
    let name = if folder.is_empty() {
        file.path.rsplit('/').next().unwrap_or(&file.path)
    } else {
        file.path.strip_prefix(folder).unwrap_or(&file.path)
    };
    Selected {
        path: file.path.clone(),
        name: name.to_owned(),
        size: file.size,
    }
}

/// Files directly inside `folder` (not in its subfolders).
fn children<'a>(files: &'a [RepoFile], folder: &'a str) -> impl Iterator<Item = &'a RepoFile> {
    files.iter().filter(move |f| {
        f.path
            .strip_prefix(folder)
            .is_some_and(|rest| !rest.is_empty() && !rest.contains('/'))
    })
}

fn base_name(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}

fn extras<'a>(files: &'a [RepoFile], folder: &'a str) -> impl Iterator<Item = &'a RepoFile> {
    children(files, folder).filter(|f| MODEL_EXTRAS.contains(&base_name(&f.path)))
}

fn model_from_file(
    files: &[RepoFile],
    file: &RepoFile,
    shown: &str,
) -> Result<Vec<Selected>, Rejection> {
    if !file.path.ends_with(".gguf") {
        return Err(refuse(
            "invalid-model",
            format!("{shown}: a model path names a folder or one .gguf file"),
        ));
    }
    let folder = file
        .path
        .rsplit_once('/')
        .map(|(dir, _)| format!("{dir}/"))
        .unwrap_or_default();
    // Small files first: a broken config fails before gigabytes of weights are fetched.
    let mut out: Vec<Selected> = extras(files, &folder)
        .map(|f| selected(f, &folder))
        .collect();
    out.push(selected(file, &folder));
    Ok(out)
}

fn model_from_folder(
    files: &[RepoFile],
    folder: &str,
    shown: &str,
) -> Result<Vec<Selected>, Rejection> {
    let is_weights = |f: &&RepoFile| {
        f.path.ends_with(".safetensors") || f.path.ends_with(".safetensors.index.json")
    };
    let mut weights: Vec<Selected> = children(files, folder)
        .filter(is_weights)
        .map(|f| selected(f, folder))
        .collect();
    if weights.is_empty() {
        let ggufs: Vec<&RepoFile> = children(files, folder)
            .filter(|f| f.path.ends_with(".gguf"))
            .collect();
        match ggufs.as_slice() {
            [] => {
                return Err(refuse(
                    "invalid-model",
                    format!("{shown}: no *.safetensors or *.gguf weights in the repository{} (PyTorch .bin weights are not supported)", at(folder)),
                ))
            }
            [one] => weights.push(selected(one, folder)),
            many => return Err(name_one(shown, folder, many, "GGUF files")),
        }
    }
    // Small files first: a broken config fails before gigabytes of weights are fetched.
    let mut out: Vec<Selected> = extras(files, folder).map(|f| selected(f, folder)).collect();
    out.append(&mut weights);
    Ok(out)
}

fn dataset_from_folder(
    files: &[RepoFile],
    folder: &str,
    shown: &str,
) -> Result<Vec<Selected>, Rejection> {
    let data: Vec<&RepoFile> = files
        .iter()
        .filter(|f| f.path.starts_with(folder))
        .filter(|f| DatasetFormat::from_file_name(&f.path).is_some())
        .collect();
    match data.as_slice() {
        [] => Err(refuse(
            "invalid-dataset",
            format!(
                "{shown}: no .jsonl, .csv or .txt file in the repository{}",
                at(folder)
            ),
        )),
        [one] => Ok(vec![selected(one, "")]),
        many => Err(name_one(shown, folder, many, "data files")),
    }
}

fn at(folder: &str) -> String {
    if folder.is_empty() {
        String::new()
    } else {
        format!(" under `{folder}`")
    }
}

fn name_one(shown: &str, folder: &str, many: &[&RepoFile], what: &str) -> Rejection {
    let listed: Vec<&str> = many.iter().take(LISTED).map(|f| f.path.as_str()).collect();
    let more = if many.len() > LISTED { ", …" } else { "" };
    refuse(
        if what == "data files" {
            "invalid-dataset"
        } else {
            "invalid-model"
        },
        format!(
            "{shown}: the repository holds {} {what}{} ({}{more}); name one in the URI, e.g. {}/{}",
            many.len(),
            at(folder),
            listed.join(", "),
            shown.trim_end_matches('/'),
            listed[0].strip_prefix(folder).unwrap_or(listed[0]),
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn repo(paths: &[&str]) -> Vec<RepoFile> {
        paths
            .iter()
            .map(|p| RepoFile {
                path: (*p).to_owned(),
                size: Some(1),
            })
            .collect()
    }

    fn names(selected: &[Selected]) -> Vec<&str> {
        selected.iter().map(|s| s.name.as_str()).collect()
    }

    const BERT_REPO: &[&str] = &[
        ".gitattributes",
        "README.md",
        "config.json",
        "model.safetensors",
        "pytorch_model.bin",
        "onnx/model.onnx",
        "1_Pooling/config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "vocab.txt",
    ];

    #[test]
    fn a_model_repo_brings_its_safetensors_config_and_tokenizer_only() {
        let picked = select(&repo(BERT_REPO), None, InputKind::Model, "hf://o/m").unwrap();
        assert_eq!(
            names(&picked),
            [
                "config.json",
                "tokenizer.json",
                "tokenizer_config.json",
                "vocab.txt",
                "model.safetensors",
            ]
        );
    }

    #[test]
    fn sharded_weights_come_with_their_index() {
        let files = repo(&[
            "config.json",
            "model-00001-of-00002.safetensors",
            "model-00002-of-00002.safetensors",
            "model.safetensors.index.json",
        ]);
        let picked = select(&files, None, InputKind::Model, "hf://o/m").unwrap();
        assert_eq!(picked.len(), 4);
    }

    #[test]
    fn several_ggufs_must_be_named_and_a_named_one_is_taken_with_its_tokenizer() {
        let files = repo(&["q4/a.gguf", "q4/b.gguf", "q4/tokenizer.json", "README.md"]);
        let err = select(&files, Some("q4"), InputKind::Model, "hf://o/m").unwrap_err();
        assert_eq!(err.slug, "invalid-model");
        assert!(err.message.contains("hf://o/m/a.gguf"), "{err}");
        let picked = select(&files, Some("q4/b.gguf"), InputKind::Model, "hf://o/m").unwrap();
        assert_eq!(names(&picked), ["tokenizer.json", "b.gguf"]);
        assert_eq!(picked[1].path, "q4/b.gguf");
    }

    #[test]
    fn a_repo_without_usable_weights_or_a_missing_path_is_refused() {
        let files = repo(&["config.json", "pytorch_model.bin"]);
        let err = select(&files, None, InputKind::Model, "hf://o/m").unwrap_err();
        assert!(err.message.contains("PyTorch"), "{err}");
        let err = select(&repo(BERT_REPO), Some("nope"), InputKind::Model, "x").unwrap_err();
        assert_eq!(err.slug, "uri-not-found");
        let err = select(&repo(BERT_REPO), Some("README.md"), InputKind::Model, "x").unwrap_err();
        assert_eq!(err.slug, "invalid-model");
    }

    #[test]
    fn a_dataset_is_the_one_data_file_or_the_one_named() {
        let one = repo(&["README.md", "data/train.jsonl"]);
        let picked = select(&one, None, InputKind::Dataset, "hf://datasets/o/d").unwrap();
        assert_eq!(names(&picked), ["train.jsonl"]);
        assert_eq!(picked[0].path, "data/train.jsonl");
        let two = repo(&["a.csv", "b.jsonl"]);
        let err = select(&two, None, InputKind::Dataset, "hf://datasets/o/d").unwrap_err();
        assert_eq!(err.slug, "invalid-dataset");
        assert!(err.message.contains("2 data files"), "{err}");
        let picked = select(&two, Some("b.jsonl"), InputKind::Dataset, "x").unwrap();
        assert_eq!(names(&picked), ["b.jsonl"]);
    }
}
