//! Renumbering a tokenizer to a trimmed vocabulary (see [`crate::family::trim_vocabulary`]).
//!
//! Old token `kept[i]` becomes token `i` in every tokenizer file that stores ids: `tokenizer.json`
//! (the model's vocabulary, the added tokens, the post-processor's special tokens, the padding
//! id), `vocab.txt` (one token per line, line = id) and `tokenizer_config.json`'s
//! `added_tokens_decoder`. Only vocabularies that map whole tokens to ids can be renumbered this
//! way: WordPiece (BERT) and WordLevel. WordPiece matches the longest known prefix first, so as
//! long as every token the data was split into is kept, the data is split exactly as before; text
//! outside the data may fall back to shorter pieces or `[UNK]`. BPE vocabularies (Llama) cannot
//! lose tokens their merges build on, and are refused.

use std::collections::{BTreeSet, HashMap};

use serde_json::{Map, Value};
use tokenizers::Tokenizer;

use crate::error::{EngineError, Result};

/// Tokenizer files a trimmed model ships, by name, as bytes.
pub type TokenizerFiles = Vec<(String, Vec<u8>)>;

/// The ids to keep for a task whose data uses `used`: those, every added (special) token, the
/// unknown and padding tokens and those the post-processor inserts, ascending, so the special tokens
/// keep their relative order.
///
/// # Errors
/// A `tokenizer.json` that is not JSON or whose vocabulary cannot be renumbered.
pub fn task_vocabulary(
    tokenizer_json: &[u8],
    used: impl IntoIterator<Item = u32>,
) -> Result<Vec<u32>> {
    let tokenizer = parse(tokenizer_json)?;
    let vocab = model_vocab(&tokenizer)?;
    let mut kept: BTreeSet<u32> = used.into_iter().collect();
    for added in tokenizer["added_tokens"].as_array().into_iter().flatten() {
        if let Some(id) = added["id"].as_u64() {
            kept.insert(id as u32);
        }
    }
    if let Some(unk) = tokenizer["model"]["unk_token"].as_str() {
        if let Some(id) = vocab.get(unk) {
            kept.insert(*id);
        }
    }
    if let Some(pad) = tokenizer["padding"]["pad_id"].as_u64() {
        kept.insert(pad as u32);
    }
    // The tokens a post-processor inserts ([CLS], [SEP]).
    let processor = &tokenizer["post_processor"];
    let processors: Vec<&Value> = match processor["processors"].as_array() {
        Some(inner) => inner.iter().collect(),
        None => vec![processor],
    };
    for p in processors {
        for special in p["special_tokens"]
            .as_object()
            .into_iter()
            .flat_map(|m| m.values())
        {
            let ids = special["ids"].as_array().into_iter().flatten();
            kept.extend(ids.filter_map(Value::as_u64).map(|id| id as u32));
        }
        for key in ["sep", "cls"] {
            if let Some(id) = p[key].get(1).and_then(Value::as_u64) {
                kept.insert(id as u32);
            }
        }
    }
    Ok(kept.into_iter().collect())
}

/// Rewrites `files` (as read from a model folder) for the vocabulary `kept`; files without ids
/// (`special_tokens_map.json`) are returned unchanged. The new `tokenizer.json` is loaded once to
/// prove it valid.
///
/// # Errors
/// No `tokenizer.json`, a vocabulary that is not WordPiece or WordLevel, a kept id no token has,
/// or a special token that is not kept.
pub fn rewrite_tokenizer_files(
    files: &[(String, Vec<u8>)],
    kept: &[u32],
) -> Result<TokenizerFiles> {
    let json = files
        .iter()
        .find(|(n, _)| n == "tokenizer.json")
        .ok_or_else(|| EngineError::InvalidModel("the model has no tokenizer.json".into()))?;
    let tokenizer = parse(&json.1)?;
    let vocab = model_vocab(&tokenizer)?;
    let mut token_of: HashMap<u32, String> = vocab.iter().map(|(t, &id)| (id, t.clone())).collect();
    for added in tokenizer["added_tokens"].as_array().into_iter().flatten() {
        if let (Some(id), Some(content)) = (added["id"].as_u64(), added["content"].as_str()) {
            token_of
                .entry(id as u32)
                .or_insert_with(|| content.to_owned());
        }
    }
    let new_id: HashMap<u32, u32> = kept
        .iter()
        .enumerate()
        .map(|(new, &old)| (old, new as u32))
        .collect();
    let tokens: Vec<String> = kept
        .iter()
        .map(|old| {
            token_of.get(old).cloned().ok_or_else(|| {
                EngineError::InvalidModel(format!("tokenizer.json has no token with id {old}"))
            })
        })
        .collect::<Result<_>>()?;
    let new_id_of_token: HashMap<&str, u32> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.as_str(), i as u32))
        .collect();
    let renumber = |old: u64, what: &str| -> Result<u32> {
        new_id.get(&(old as u32)).copied().ok_or_else(|| {
            EngineError::InvalidSetting(format!("the trimmed vocabulary drops {what} (id {old})"))
        })
    };

    let mut rewritten = Vec::with_capacity(files.len());
    for (name, bytes) in files {
        let bytes = match name.as_str() {
            "tokenizer.json" => {
                let value = rewrite_tokenizer_json(
                    tokenizer.clone(),
                    &tokens,
                    &vocab,
                    &renumber,
                    &new_id_of_token,
                )?;
                let text = serde_json::to_vec_pretty(&value).map_err(json_error)?;
                Tokenizer::from_bytes(&text).map_err(|e| {
                    EngineError::Tokenizer(format!("the renumbered tokenizer.json: {e}"))
                })?;
                text
            }
            "vocab.txt" => {
                let mut text = tokens.join("\n");
                text.push('\n');
                text.into_bytes()
            }
            "tokenizer_config.json" => {
                let mut config = parse(bytes)?;
                if let Some(decoder) = config
                    .get_mut("added_tokens_decoder")
                    .and_then(Value::as_object_mut)
                {
                    let mut renumbered = Map::new();
                    for (id, entry) in std::mem::take(decoder) {
                        let old: u64 = id.parse().map_err(|_| {
                            EngineError::InvalidModel(format!(
                                "tokenizer_config.json: added token id '{id}' is not a number"
                            ))
                        })?;
                        renumbered.insert(renumber(old, "an added token")?.to_string(), entry);
                    }
                    *decoder = renumbered;
                }
                serde_json::to_vec_pretty(&config).map_err(json_error)?
            }
            _ => bytes.clone(),
        };
        rewritten.push((name.clone(), bytes));
    }
    Ok(rewritten)
}

/// The tokenizer files found in `dir` (those a model folder ships, see
/// [`crate::export::TOKENIZER_FILES`]), by name.
///
/// # Errors
/// A file that exists but cannot be read.
pub fn read_tokenizer_files(dir: &std::path::Path) -> Result<TokenizerFiles> {
    let mut files = Vec::new();
    for name in crate::export::TOKENIZER_FILES {
        let path = dir.join(name);
        if path.is_file() {
            let bytes = std::fs::read(&path).map_err(|e| EngineError::io(&path, e))?;
            files.push(((*name).to_owned(), bytes));
        }
    }
    Ok(files)
}

/// The id of the unknown token of a WordPiece or WordLevel `tokenizer.json`, if it has one.
pub fn unknown_token_id(tokenizer_json: &[u8]) -> Option<u32> {
    let tokenizer = parse(tokenizer_json).ok()?;
    let unk = tokenizer["model"]["unk_token"].as_str()?;
    model_vocab(&tokenizer).ok()?.get(unk).copied()
}

fn rewrite_tokenizer_json(
    mut tokenizer: Value,
    tokens: &[String],
    vocab: &HashMap<String, u32>,
    renumber: &dyn Fn(u64, &str) -> Result<u32>,
    new_id_of_token: &HashMap<&str, u32>,
) -> Result<Value> {
    let model_vocab: Map<String, Value> = tokens
        .iter()
        .enumerate()
        .filter(|(_, t)| vocab.contains_key(*t))
        .map(|(i, t)| (t.clone(), Value::from(i)))
        .collect();
    tokenizer["model"]["vocab"] = Value::Object(model_vocab);

    if let Some(added) = tokenizer["added_tokens"].as_array_mut() {
        for token in added.iter_mut() {
            if let Some(old) = token["id"].as_u64() {
                let what = format!(
                    "the added token {}",
                    token["content"].as_str().unwrap_or("?")
                );
                token["id"] = renumber(old, &what)?.into();
            }
        }
    }
    if let Some(padding) = tokenizer.get_mut("padding").filter(|p| p.is_object()) {
        if let Some(old) = padding["pad_id"].as_u64() {
            padding["pad_id"] = renumber(old, "the padding token")?.into();
        }
    }
    if let Some(processor) = tokenizer.get_mut("post_processor") {
        renumber_processor(processor, new_id_of_token)?;
    }
    Ok(tokenizer)
}

/// Renumbers the special tokens a post-processor inserts, by their text.
fn renumber_processor(processor: &mut Value, new_id_of_token: &HashMap<&str, u32>) -> Result<()> {
    let lookup = |token: &str| {
        new_id_of_token.get(token).copied().ok_or_else(|| {
            EngineError::InvalidSetting(format!(
                "the trimmed vocabulary drops the special token {token}"
            ))
        })
    };
    match processor["type"].as_str() {
        Some("TemplateProcessing") => {
            if let Some(specials) = processor["special_tokens"].as_object_mut() {
                for special in specials.values_mut() {
                    let ids = special["tokens"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .map(|t| lookup(t.as_str().unwrap_or_default()))
                        .collect::<Result<Vec<u32>>>()?;
                    special["ids"] = ids.into();
                }
            }
        }
        Some("BertProcessing" | "RobertaProcessing") => {
            for key in ["sep", "cls"] {
                if let Some(pair) = processor[key].as_array_mut() {
                    let token = pair
                        .first()
                        .and_then(Value::as_str)
                        .unwrap_or_default()
                        .to_owned();
                    if pair.len() == 2 {
                        pair[1] = lookup(&token)?.into();
                    }
                }
            }
        }
        Some("Sequence") => {
            if let Some(inner) = processor["processors"].as_array_mut() {
                for p in inner {
                    renumber_processor(p, new_id_of_token)?;
                }
            }
        }
        _ => {}
    }
    Ok(())
}

/// The model's `token → id` vocabulary, for the kinds that can be renumbered.
fn model_vocab(tokenizer: &Value) -> Result<HashMap<String, u32>> {
    let kind = tokenizer["model"]["type"].as_str().unwrap_or("unknown");
    if !matches!(kind, "WordPiece" | "WordLevel") {
        return Err(EngineError::InvalidSetting(format!(
            "vocabulary trimming needs a WordPiece or WordLevel tokenizer (BERT-style); this \
             model's tokenizer is {kind}, whose merges need tokens the data may not use"
        )));
    }
    let vocab = tokenizer["model"]["vocab"].as_object().ok_or_else(|| {
        EngineError::InvalidModel(
            "tokenizer.json: model.vocab is not a map of tokens to ids".into(),
        )
    })?;
    vocab
        .iter()
        .map(|(t, id)| {
            let id = id.as_u64().ok_or_else(|| {
                EngineError::InvalidModel(format!(
                    "tokenizer.json: the id of '{t}' is not a number"
                ))
            })?;
            Ok((t.clone(), id as u32))
        })
        .collect()
}

fn parse(bytes: &[u8]) -> Result<Value> {
    serde_json::from_slice(bytes)
        .map_err(|e| EngineError::Tokenizer(format!("tokenizer file is not JSON: {e}")))
}

fn json_error(e: serde_json::Error) -> EngineError {
    EngineError::Tokenizer(e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    const WORDPIECE: &str = r###"{
      "version": "1.0", "truncation": null,
      "padding": {"strategy": "BatchLongest", "direction": "Right", "pad_to_multiple_of": null,
                  "pad_id": 0, "pad_type_id": 0, "pad_token": "[PAD]"},
      "added_tokens": [
        {"id": 0, "content": "[PAD]", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true},
        {"id": 1, "content": "[UNK]", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true},
        {"id": 2, "content": "[CLS]", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true},
        {"id": 3, "content": "[SEP]", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}],
      "normalizer": {"type": "BertNormalizer", "clean_text": true, "handle_chinese_chars": true, "strip_accents": null, "lowercase": true},
      "pre_tokenizer": {"type": "BertPreTokenizer"},
      "post_processor": {"type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": "[CLS]", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                   {"SpecialToken": {"id": "[SEP]", "type_id": 0}}],
        "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {"[CLS]": {"id": "[CLS]", "ids": [2], "tokens": ["[CLS]"]},
                           "[SEP]": {"id": "[SEP]", "ids": [3], "tokens": ["[SEP]"]}}},
      "decoder": {"type": "WordPiece", "prefix": "##", "cleanup": true},
      "model": {"type": "WordPiece", "unk_token": "[UNK]", "continuing_subword_prefix": "##",
        "max_input_chars_per_word": 100,
        "vocab": {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, "play": 4, "##ing": 5, "##ed": 6,
                  "game": 7, "score": 8, "market": 9, "bank": 10, "##s": 11, "rate": 12, "the": 13}}
    }"###;

    fn encode(json: &[u8], text: &str) -> Vec<u32> {
        Tokenizer::from_bytes(json)
            .unwrap()
            .encode(text, true)
            .unwrap()
            .get_ids()
            .to_vec()
    }

    #[test]
    fn a_renumbered_wordpiece_tokenizer_splits_the_data_as_before() {
        let text = "The game: playing, played; scores";
        let old = encode(WORDPIECE.as_bytes(), text);
        assert_eq!(old, [2, 13, 7, 1, 4, 5, 1, 4, 6, 1, 8, 11, 3]);
        let kept = task_vocabulary(WORDPIECE.as_bytes(), old.iter().copied()).unwrap();
        // Every special token is kept, the unused words are not.
        assert_eq!(kept, [0, 1, 2, 3, 4, 5, 6, 7, 8, 11, 13]);

        let files = vec![
            ("tokenizer.json".to_owned(), WORDPIECE.as_bytes().to_vec()),
            ("vocab.txt".to_owned(), b"ignored\n".to_vec()),
            (
                "tokenizer_config.json".to_owned(),
                br#"{"added_tokens_decoder": {"0": {"content": "[PAD]"}, "3": {"content": "[SEP]"}}}"#.to_vec(),
            ),
            ("special_tokens_map.json".to_owned(), b"{}".to_vec()),
        ];
        let rewritten = rewrite_tokenizer_files(&files, &kept).unwrap();
        let file = |name: &str| rewritten.iter().find(|(n, _)| n == name).unwrap().1.clone();
        let new = encode(&file("tokenizer.json"), text);
        let new_ids = crate::family::renumbering(&kept, 14);
        let want: Vec<u32> = old.iter().map(|&i| new_ids[i as usize].unwrap()).collect();
        assert_eq!(new, want);
        // Words the data never used fall back to [UNK] (id 1, unchanged).
        assert_eq!(encode(&file("tokenizer.json"), "bank rate"), [2, 1, 1, 3]);
        let vocab_txt = String::from_utf8(file("vocab.txt")).unwrap();
        assert_eq!(vocab_txt.lines().nth(9), Some("##s"));
        assert_eq!(vocab_txt.lines().count(), kept.len());
        let config: Value = serde_json::from_slice(&file("tokenizer_config.json")).unwrap();
        assert_eq!(config["added_tokens_decoder"]["3"]["content"], "[SEP]");
        assert_eq!(file("special_tokens_map.json"), b"{}");
    }

    #[test]
    fn special_tokens_cannot_be_dropped_and_bpe_is_refused() {
        let files = vec![("tokenizer.json".to_owned(), WORDPIECE.as_bytes().to_vec())];
        let err = rewrite_tokenizer_files(&files, &[0, 1, 3, 4])
            .unwrap_err()
            .to_string();
        assert!(err.contains("[CLS]"), "{err}");
        let err = rewrite_tokenizer_files(&files, &[0, 1, 2, 3, 99])
            .unwrap_err()
            .to_string();
        assert!(err.contains("id 99"), "{err}");
        let bpe = br#"{"model": {"type": "BPE", "vocab": {}, "merges": []}}"#;
        let err = task_vocabulary(bpe, [0]).unwrap_err().to_string();
        assert!(err.contains("BPE"), "{err}");
    }
}
