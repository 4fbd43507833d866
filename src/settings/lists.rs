//! List-valued settings in the forms people type: a TOML (or JSON) array in a config file, or one
//! string from an environment variable — `COMPRESSD_ALLOWED_FILE_ROOTS=/data/models,/srv/models`
//! or, for paths, `PATH`-style `/data/models:/srv/models`.
//!
//! Figment reads `[…]` in a variable as an array and anything else as a string, so both forms
//! reach these deserializers; without them a plain string stopped the process ("expected a
//! sequence").

use std::fmt;
use std::path::PathBuf;

use serde::de::{self, Deserializer, SeqAccess, Visitor};

/// A list of strings: an array, or one comma-separated string (items trimmed, empty ones dropped,
/// so an empty string is an empty list).
///
/// # Errors
/// When the value is neither an array of strings nor a string.
pub fn comma_separated<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Vec<String>, D::Error> {
    deserializer.deserialize_any(ListVisitor { separators: &[','] })
}

/// A list of paths: an array, or one string separated by commas or by the platform's `PATH`
/// separator (`:` on Unix, `;` on Windows).
///
/// # Errors
/// When the value is neither an array of strings nor a string.
pub fn path_list<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<PathBuf>, D::Error> {
    let separators: &[char] = if cfg!(windows) {
        &[',', ';']
    } else {
        &[',', ':']
    };
    let items = deserializer.deserialize_any(ListVisitor { separators })?;
    Ok(items.into_iter().map(PathBuf::from).collect())
}

struct ListVisitor {
    separators: &'static [char],
}

impl<'de> Visitor<'de> for ListVisitor {
    type Value = Vec<String>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "a list: an array of strings, or one string of items separated by {}",
            self.separators
                .iter()
                .map(|c| format!("`{c}`"))
                .collect::<Vec<_>>()
                .join(" or ")
        )
    }

    fn visit_str<E: de::Error>(self, value: &str) -> Result<Self::Value, E> {
        Ok(value
            .split(self.separators)
            .map(str::trim)
            .filter(|item| !item.is_empty())
            .map(str::to_owned)
            .collect())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0));
        while let Some(item) = seq.next_element::<String>()? {
            items.push(item);
        }
        Ok(items)
    }
}
