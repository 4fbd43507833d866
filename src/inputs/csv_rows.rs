//! Chunk-fed CSV record reader on `csv-core` (RFC 4180: quoted fields may hold commas, quotes and
//! newlines), so a CSV upload is parsed while it streams, with at most one record in memory.

use csv_core::{ReadRecordResult, Reader};

/// One parsed record: the line it starts on, and its fields (or `None` if it was over the cap).
pub(crate) type Record<'a> = (u64, Option<Vec<&'a [u8]>>);

/// Streaming CSV reader.
pub(crate) struct CsvRows {
    reader: Reader,
    out: Vec<u8>,
    out_len: usize,
    ends: Vec<usize>,
    ends_len: usize,
    /// Line the record being read started on (1-based).
    start_line: u64,
    max_record: usize,
    too_long: bool,
}

impl CsvRows {
    /// A reader that refuses records longer than `max_record` bytes.
    pub(crate) fn new(max_record: usize) -> Self {
        Self {
            reader: Reader::new(),
            out: vec![0; 4096],
            out_len: 0,
            ends: vec![0; 64],
            ends_len: 0,
            start_line: 1,
            max_record,
            too_long: false,
        }
    }

    /// Feeds bytes (never empty: an empty slice means end of data to `csv-core`).
    pub(crate) fn feed<E>(
        &mut self,
        chunk: &[u8],
        on_record: impl FnMut(Record<'_>) -> Result<(), E>,
    ) -> Result<(), E> {
        if chunk.is_empty() {
            return Ok(());
        }
        self.run(chunk, on_record)
    }

    /// Signals the end of data, delivering a last record without a trailing newline.
    pub(crate) fn finish<E>(
        mut self,
        on_record: impl FnMut(Record<'_>) -> Result<(), E>,
    ) -> Result<(), E> {
        self.run(&[], on_record)
    }

    fn run<E>(
        &mut self,
        mut input: &[u8],
        mut on_record: impl FnMut(Record<'_>) -> Result<(), E>,
    ) -> Result<(), E> {
        loop {
            let (result, nin, nout, nend) = self.reader.read_record(
                input,
                &mut self.out[self.out_len..],
                &mut self.ends[self.ends_len..],
            );
            input = &input[nin..];
            self.out_len += nout;
            self.ends_len += nend;
            match result {
                ReadRecordResult::InputEmpty => return Ok(()),
                ReadRecordResult::End => return Ok(()),
                ReadRecordResult::OutputFull => self.grow_output(),
                ReadRecordResult::OutputEndsFull => self.ends.resize(self.ends.len() * 2, 0),
                ReadRecordResult::Record => {
                    let line = self.start_line;
                    let fields = (!self.too_long).then(|| self.fields());
                    let result = on_record((line, fields));
                    self.out_len = 0;
                    self.ends_len = 0;
                    self.too_long = false;
                    self.start_line = self.reader.line();
                    result?;
                }
            }
        }
    }

    /// Doubles the record buffer, or past the cap keeps overwriting it and marks the record.
    fn grow_output(&mut self) {
        if self.out.len() * 2 <= self.max_record {
            self.out.resize(self.out.len() * 2, 0);
        } else {
            self.too_long = true;
            self.out_len = 0;
        }
    }

    fn fields(&self) -> Vec<&[u8]> {
        let mut start = 0;
        self.ends[..self.ends_len]
            .iter()
            .map(|&end| {
                let field = &self.out[start..end];
                start = end;
                field
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn records(input: &[u8], chunk: usize) -> Vec<(u64, Vec<String>)> {
        let mut out = Vec::new();
        let mut rows = CsvRows::new(1 << 20);
        let mut collect = |(line, fields): Record<'_>| -> Result<(), ()> {
            let fields = fields
                .unwrap()
                .iter()
                .map(|f| String::from_utf8(f.to_vec()).unwrap())
                .collect();
            out.push((line, fields));
            Ok(())
        };
        for c in input.chunks(chunk) {
            rows.feed(c, &mut collect).unwrap();
        }
        rows.finish(&mut collect).unwrap();
        out
    }

    #[test]
    fn parses_quoted_fields_across_chunks_with_start_lines() {
        let input = b"text,label\n\"a, \"\"quoted\"\"\nline\",x\nplain,y";
        for chunk in [1, 4, 100] {
            let got = records(input, chunk);
            assert_eq!(got.len(), 3, "chunk {chunk}");
            assert_eq!(
                got[1],
                (2, vec!["a, \"quoted\"\nline".to_string(), "x".to_string()])
            );
            assert_eq!(got[2], (4, vec!["plain".to_string(), "y".to_string()]));
        }
    }
}
