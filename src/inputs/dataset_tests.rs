//! Unit tests of [`DatasetInspector`] on small in-memory datasets.

use super::*;

fn inspect(bytes: &[u8], options: DatasetOptions) -> Checked<DatasetSummary> {
    let mut inspector = DatasetInspector::new(options);
    for chunk in bytes.chunks(3) {
        inspector.feed(chunk)?;
    }
    inspector.finish()
}

fn jsonl(strict: bool) -> DatasetOptions {
    DatasetOptions {
        strict,
        ..DatasetOptions::new(DatasetFormat::Jsonl)
    }
}

#[test]
fn counts_jsonl_rows_labels_and_splits() {
    let data = b"{\"text\":\"a\",\"label\":\"x\",\"split\":\"test\"}\n\n{\"text\":\"b\",\"label\":1}\r\n{\"text\":\"c\",\"label\":\"x\"}";
    let s = inspect(data, jsonl(true)).unwrap();
    assert_eq!(s.rows, 3);
    assert_eq!(
        s.label_counts,
        BTreeMap::from([("1".into(), 1), ("x".into(), 2)])
    );
    assert_eq!(s.splits.values().sum::<u64>(), 3);
    assert!(s.splits["test"] >= 1);
    assert_eq!(s.bytes, data.len() as u64);
    assert_eq!(s.sha256, hex::encode(Sha256::digest(data)));
}

#[test]
fn hash_split_follows_the_first_byte_rule() {
    for text in ["a", "b", "hello", "another row"] {
        let expected = if Sha256::digest(text.as_bytes())[0] % 5 == 0 {
            "test"
        } else {
            "train"
        };
        assert_eq!(hash_split(text), expected);
    }
}

#[test]
fn strict_mode_refuses_the_first_bad_row_with_its_line() {
    let data = b"{\"text\":\"a\",\"label\":\"x\"}\n{\"text\":\"b\"}\n";
    let err = inspect(data, jsonl(true)).unwrap_err();
    assert_eq!(err.message, "line 2: field `label` is missing");
}

#[test]
fn lenient_mode_skips_and_reports_bad_rows() {
    let data =
        b"{\"text\":\"a\",\"label\":\"x\"}\nnot json\n{\"text\":\"b\",\"label\":\"y\"}\n\xff\xfe\n";
    let s = inspect(data, jsonl(false)).unwrap();
    assert_eq!((s.rows, s.rejected), (2, 2));
    assert_eq!(s.rejected_rows[0].line, 2);
    assert!(s.rejected_rows[0].reason.contains("JSON"));
    assert_eq!(
        s.rejected_rows[1],
        RejectedRow {
            line: 4,
            reason: "invalid UTF-8 at byte 0".into()
        }
    );
}

#[test]
fn refuses_empty_zero_row_and_single_label_datasets() {
    assert!(inspect(b"", jsonl(true))
        .unwrap_err()
        .message
        .contains("empty"));
    assert!(inspect(b"\n\n", jsonl(true))
        .unwrap_err()
        .message
        .contains("no usable rows"));
    let bad_only = inspect(b"{\"x\":1}\n", jsonl(false)).unwrap_err();
    assert!(bad_only.message.contains("no usable rows") && bad_only.message.contains("line 1"));
    let one_label = b"{\"text\":\"a\",\"label\":\"x\"}\n{\"text\":\"b\",\"label\":\"x\"}\n";
    assert!(inspect(one_label, jsonl(true))
        .unwrap_err()
        .message
        .contains("at least two labels"));
}

#[test]
fn refuses_invalid_utf8_in_strict_mode() {
    let err = inspect(
        b"{\"text\":\"a\",\"label\":\"x\"}\n{\"text\":\"\xc3\x28\",\"label\":\"y\"}\n",
        jsonl(true),
    )
    .unwrap_err();
    assert!(err.message.starts_with("line 2: invalid UTF-8"), "{err}");
}

#[test]
fn reads_csv_with_custom_fields() {
    let options = DatasetOptions {
        text_field: "body".into(),
        label_field: "tag".into(),
        ..DatasetOptions::new(DatasetFormat::Csv)
    };
    let data = b"tag,body,split\nx,\"one, with comma\",test\ny,\"two\nlines\",\nx,three,train\n";
    let s = inspect(data, options.clone()).unwrap();
    assert_eq!(s.rows, 3);
    assert_eq!(s.label_counts["x"], 2);
    assert_eq!(
        s.splits.get("test").copied().unwrap_or(0) + s.splits.get("train").copied().unwrap_or(0),
        3
    );
    let err = inspect(b"tag,text\nx,y\n", options.clone()).unwrap_err();
    assert!(err.message.contains("no column `body`"), "{err}");
    let err = inspect(b"tag,body\nx,y,z\n", options).unwrap_err();
    assert_eq!(err.message, "line 2: has 3 fields but the header has 2");
}

#[test]
fn reads_plain_text_one_example_per_line() {
    let s = inspect(
        b"first line\n\nsecond line\n",
        DatasetOptions::new(DatasetFormat::Text),
    )
    .unwrap();
    assert_eq!(s.rows, 2);
    assert!(s.label_counts.is_empty());
}

#[test]
fn infers_formats_from_file_names() {
    assert_eq!(
        DatasetFormat::from_file_name("a.JSONL"),
        Some(DatasetFormat::Jsonl)
    );
    assert_eq!(
        DatasetFormat::from_file_name("a.csv"),
        Some(DatasetFormat::Csv)
    );
    assert_eq!(
        DatasetFormat::from_file_name("a.txt"),
        Some(DatasetFormat::Text)
    );
    assert_eq!(DatasetFormat::from_file_name("a.parquet"), None);
    assert!("xml".parse::<DatasetFormat>().is_err());
}
