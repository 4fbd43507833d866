//! Splits a byte stream arriving in arbitrary chunks into numbered lines, holding at most one
//! line in memory; a line longer than the cap is reported instead of buffered.

/// A line as delivered to the caller: its 1-based number and bytes (without `\n` or `\r\n`), or
/// `None` when it exceeded the cap.
pub(crate) type Line<'a> = (u64, Option<&'a [u8]>);

/// Chunk-fed line splitter.
pub(crate) struct LineSplitter {
    partial: Vec<u8>,
    /// Number of the line being collected.
    line: u64,
    max_len: usize,
    too_long: bool,
}

impl LineSplitter {
    /// A splitter that refuses lines longer than `max_len` bytes.
    pub(crate) fn new(max_len: usize) -> Self {
        Self {
            partial: Vec::new(),
            line: 1,
            max_len,
            too_long: false,
        }
    }

    /// Feeds bytes; calls `on_line` for every line completed by them. Stops at the first error
    /// `on_line` returns.
    pub(crate) fn feed<E>(
        &mut self,
        mut chunk: &[u8],
        mut on_line: impl FnMut(Line<'_>) -> Result<(), E>,
    ) -> Result<(), E> {
        while let Some(pos) = chunk.iter().position(|&b| b == b'\n') {
            self.push(&chunk[..pos]);
            self.emit(&mut on_line)?;
            chunk = &chunk[pos + 1..];
        }
        self.push(chunk);
        Ok(())
    }

    /// Delivers a last line that had no trailing newline.
    pub(crate) fn finish<E>(
        mut self,
        mut on_line: impl FnMut(Line<'_>) -> Result<(), E>,
    ) -> Result<(), E> {
        if !self.partial.is_empty() || self.too_long {
            self.emit(&mut on_line)?;
        }
        Ok(())
    }

    fn push(&mut self, bytes: &[u8]) {
        if self.too_long {
            return;
        }
        if self.partial.len() + bytes.len() > self.max_len {
            self.too_long = true;
            self.partial = Vec::new();
        } else {
            self.partial.extend_from_slice(bytes);
        }
    }

    fn emit<E>(&mut self, on_line: &mut impl FnMut(Line<'_>) -> Result<(), E>) -> Result<(), E> {
        let line = self.line;
        self.line += 1;
        if std::mem::take(&mut self.too_long) {
            return on_line((line, None));
        }
        let mut text = self.partial.as_slice();
        if let Some(stripped) = text.strip_suffix(b"\r") {
            text = stripped;
        }
        let result = on_line((line, Some(text)));
        self.partial.clear();
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(input: &[u8], chunk: usize, max: usize) -> Vec<(u64, Option<String>)> {
        let mut out = Vec::new();
        let mut s = LineSplitter::new(max);
        let mut collect = |(n, l): Line<'_>| -> Result<(), ()> {
            out.push((n, l.map(|b| String::from_utf8(b.to_vec()).unwrap())));
            Ok(())
        };
        for c in input.chunks(chunk) {
            s.feed(c, &mut collect).unwrap();
        }
        s.finish(&mut collect).unwrap();
        out
    }

    #[test]
    fn splits_across_chunks_and_strips_crlf() {
        for chunk in [1, 2, 5, 100] {
            let lines = split(b"ab\r\n\ncd\nlast", chunk, 10);
            let expected = vec![
                (1, Some("ab".to_string())),
                (2, Some(String::new())),
                (3, Some("cd".to_string())),
                (4, Some("last".to_string())),
            ];
            assert_eq!(lines, expected, "chunk {chunk}");
        }
    }

    #[test]
    fn reports_overlong_lines_without_buffering_them() {
        let lines = split(b"short\nthis is far too long\nok\n", 3, 8);
        assert_eq!(
            lines,
            vec![(1, Some("short".into())), (2, None), (3, Some("ok".into()))]
        );
    }
}
