//! Splitting row-major work across the machine's cores.
//!
//! Quantization is independent per row, so a tensor is cut into contiguous row ranges, one per
//! core, each handled by a scoped thread. Small tensors stay on the calling thread: spawning costs
//! more than it saves below [`MIN_PARALLEL_ELEMS`].

/// Below this many elements a tensor is quantized on the calling thread.
const MIN_PARALLEL_ELEMS: usize = 1 << 16;

/// How many rows each task gets so that `rows` rows of `cols` values are spread over the cores.
pub(crate) fn rows_per_task(rows: usize, cols: usize) -> usize {
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    if rows * cols < MIN_PARALLEL_ELEMS || threads == 1 {
        return rows.max(1);
    }
    rows.div_ceil(threads).max(1)
}
