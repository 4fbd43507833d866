//! Parsing of a `Range: bytes=…` request header (RFC 9110 §14.1.2), single ranges only: a
//! multi-range request is answered with the whole file, which the RFC allows.

use std::ops::Range;

/// What a `Range` header asks of a file of known size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RangeRequest {
    /// A range inside the file (end exclusive).
    Satisfiable(Range<u64>),
    /// Unparseable, not `bytes`, or several ranges: serve the whole file.
    Ignored,
    /// Starts at or past the end: 416.
    Unsatisfiable,
}

/// Interprets `header` for a file of `size` bytes.
pub fn parse_range(header: &str, size: u64) -> RangeRequest {
    let Some(spec) = header.trim().strip_prefix("bytes=") else {
        return RangeRequest::Ignored;
    };
    if spec.contains(',') {
        return RangeRequest::Ignored;
    }
    let Some((start, end)) = spec.trim().split_once('-') else {
        return RangeRequest::Ignored;
    };
    let (start, end) = (start.trim(), end.trim());
    let parsed = match (start.is_empty(), end.is_empty()) {
        // `bytes=-N`: the last N bytes.
        (true, false) => end
            .parse::<u64>()
            .ok()
            .map(|n| (size.saturating_sub(n), size, n == 0)),
        (false, true) => start.parse::<u64>().ok().map(|s| (s, size, false)),
        (false, false) => match (start.parse::<u64>(), end.parse::<u64>()) {
            (Ok(s), Ok(e)) if e >= s => Some((s, (e + 1).min(size), false)),
            _ => None,
        },
        (true, true) => None,
    };
    match parsed {
        None => RangeRequest::Ignored,
        Some((_, _, true)) => RangeRequest::Unsatisfiable,
        Some((start, _, _)) if start >= size => RangeRequest::Unsatisfiable,
        Some((start, end, _)) => RangeRequest::Satisfiable(start..end),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_three_single_range_forms() {
        assert_eq!(
            parse_range("bytes=0-9", 100),
            RangeRequest::Satisfiable(0..10)
        );
        assert_eq!(
            parse_range("bytes=90-", 100),
            RangeRequest::Satisfiable(90..100)
        );
        assert_eq!(
            parse_range("bytes=-5", 100),
            RangeRequest::Satisfiable(95..100)
        );
        assert_eq!(
            parse_range("bytes=50-500", 100),
            RangeRequest::Satisfiable(50..100)
        );
        assert_eq!(
            parse_range("bytes=-500", 100),
            RangeRequest::Satisfiable(0..100)
        );
    }

    #[test]
    fn refuses_ranges_past_the_end_and_ignores_the_rest() {
        assert_eq!(parse_range("bytes=100-", 100), RangeRequest::Unsatisfiable);
        assert_eq!(parse_range("bytes=-0", 100), RangeRequest::Unsatisfiable);
        assert_eq!(parse_range("bytes=5-1", 100), RangeRequest::Ignored);
        assert_eq!(parse_range("bytes=0-1,5-6", 100), RangeRequest::Ignored);
        assert_eq!(parse_range("items=0-1", 100), RangeRequest::Ignored);
        assert_eq!(parse_range("bytes=x-", 100), RangeRequest::Ignored);
    }
}
