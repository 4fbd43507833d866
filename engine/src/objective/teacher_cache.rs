//! Frozen models' outputs kept per example across epochs (`cache_teacher`), so a teacher runs
//! once per example instead of once per epoch.
//!
//! Batches are reshuffled every epoch, so the cache holds rows, not batches: each example's
//! outputs cut to its real tokens, keyed by those tokens. A batch whose rows are all cached is
//! assembled from them (padded with zeros to the batch's length; every objective weights padded
//! positions by zero, and a real position's output does not depend on the padding after it), and
//! the frozen models do not run; otherwise they run on the rows not held (the whole batch in the
//! first epoch), which are stored while the byte budget lasts, so a budget that holds half the
//! examples saves about half the teacher's work. A teacher has no dropout, so a stored row is what it
//! would compute again, up to float summation order.

use std::collections::HashMap;

use candle_core::{Result, Tensor};
use serde::Serialize;

use crate::data::Batch;
use crate::models::TaskOutput;

/// What the cache did over a training run, for the stage report.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct TeacherCacheReport {
    /// The byte budget.
    pub budget_bytes: usize,
    /// Bytes of the rows held at the end.
    pub cached_bytes: usize,
    /// Examples held.
    pub cached_examples: usize,
    /// Examples that did not fit in the budget (their teacher outputs are recomputed).
    pub examples_over_budget: usize,
    /// Batches assembled wholly from the cache (the frozen models did not run).
    pub batches_from_cache: usize,
    /// Batches the frozen models ran on (for the rows not held).
    pub batches_computed: usize,
}

/// One example's outputs of every frozen model, cut to its real tokens.
struct CachedRow {
    outputs: Vec<TaskOutput>,
}

/// The per-example cache.
pub(super) struct TeacherCache {
    rows: HashMap<Vec<u32>, CachedRow>,
    report: TeacherCacheReport,
    /// Keys already counted as over the budget.
    refused: std::collections::HashSet<Vec<u32>>,
}

impl TeacherCache {
    pub(super) fn new(budget_bytes: usize) -> Self {
        Self {
            rows: HashMap::new(),
            report: TeacherCacheReport {
                budget_bytes,
                ..TeacherCacheReport::default()
            },
            refused: std::collections::HashSet::new(),
        }
    }

    pub(super) fn report(&self) -> TeacherCacheReport {
        self.report.clone()
    }

    /// The frozen outputs of `batch`: rows held come from the cache; the frozen models run
    /// (through `compute`) on the rows that are not, which are then stored while the budget lasts.
    pub(super) fn outputs(
        &mut self,
        batch: &Batch,
        compute: impl FnOnce(&Batch) -> Result<Vec<TaskOutput>>,
    ) -> Result<Vec<TaskOutput>> {
        let keys = row_keys(batch)?;
        let missing: Vec<usize> = (0..keys.len())
            .filter(|&i| !self.rows.contains_key(&keys[i].0))
            .collect();
        if missing.is_empty() {
            self.report.batches_from_cache += 1;
        } else {
            self.report.batches_computed += 1;
        }
        // Every row missing (the first epoch): the batch's own outputs are the answer.
        if missing.len() == keys.len() {
            let outputs = compute(batch)?;
            for (row, (key, len)) in keys.into_iter().enumerate() {
                self.store(key, || cut_rows(&outputs, row, len))?;
            }
            return Ok(outputs);
        }
        // Otherwise the frozen models run on the missing rows alone.
        let mut fresh: HashMap<usize, CachedRow> = HashMap::new();
        if !missing.is_empty() {
            let sub = select_rows(batch, &missing)?;
            let outputs = compute(&sub)?;
            for (j, &row) in missing.iter().enumerate() {
                let (key, len) = &keys[row];
                let cut = CachedRow {
                    outputs: cut_rows(&outputs, j, *len)?,
                };
                if !self.fits(key, &cut) {
                    fresh.insert(row, cut);
                    continue;
                }
                self.insert(key.clone(), cut);
            }
        }
        let seq = batch.input_ids.dim(1)?;
        let rows: Vec<&CachedRow> = keys
            .iter()
            .enumerate()
            .map(|(i, (key, _))| fresh.get(&i).or_else(|| self.rows.get(key)))
            .collect::<Option<_>>()
            .ok_or_else(|| candle_core::Error::Msg("teacher cache lost a row".into()))?;
        assemble(&rows, seq)
    }

    /// Stores the row `make` cuts under `key` if it is new and fits the budget.
    fn store(
        &mut self,
        key: Vec<u32>,
        make: impl FnOnce() -> Result<Vec<TaskOutput>>,
    ) -> Result<()> {
        if self.rows.contains_key(&key) || self.refused.contains(&key) {
            return Ok(());
        }
        let row = CachedRow { outputs: make()? };
        if self.fits(&key, &row) {
            self.insert(key, row);
        }
        Ok(())
    }

    /// Whether `row` fits what is left of the budget; a row that does not is counted once.
    fn fits(&mut self, key: &[u32], row: &CachedRow) -> bool {
        if self.report.cached_bytes + row.bytes() <= self.report.budget_bytes {
            return true;
        }
        if self.refused.insert(key.to_vec()) {
            self.report.examples_over_budget += 1;
        }
        false
    }

    fn insert(&mut self, key: Vec<u32>, row: CachedRow) {
        self.report.cached_bytes += row.bytes();
        self.report.cached_examples += 1;
        self.rows.insert(key, row);
    }
}

impl CachedRow {
    fn bytes(&self) -> usize {
        self.outputs
            .iter()
            .flat_map(|o| {
                std::iter::once(&o.logits)
                    .chain(&o.hidden_states)
                    .chain(&o.attentions)
            })
            .map(|t| t.elem_count() * t.dtype().size_in_bytes())
            .sum()
    }
}

/// Each row's real tokens (the key) and their count.
fn row_keys(batch: &Batch) -> Result<Vec<(Vec<u32>, usize)>> {
    let ids = batch.input_ids.to_vec2::<u32>()?;
    let mask = batch
        .attention_mask
        .to_dtype(candle_core::DType::U32)?
        .to_vec2::<u32>()?;
    Ok(ids
        .into_iter()
        .zip(mask)
        .map(|(ids, mask)| {
            let key: Vec<u32> = ids
                .iter()
                .zip(&mask)
                .filter(|(_, &m)| m != 0)
                .map(|(&id, _)| id)
                .collect();
            let len = key.len();
            (key, len)
        })
        .collect())
}

/// Row `row` of every frozen model's outputs, cut to its first `len` positions.
fn cut_rows(outputs: &[TaskOutput], row: usize, len: usize) -> Result<Vec<TaskOutput>> {
    outputs.iter().map(|o| cut_row(o, row, len)).collect()
}

/// The batch of rows `rows` of `batch` (same padded length).
fn select_rows(batch: &Batch, rows: &[usize]) -> Result<Batch> {
    let index: Vec<u32> = rows.iter().map(|&r| r as u32).collect();
    let index = Tensor::from_vec(index, rows.len(), batch.input_ids.device())?;
    Ok(Batch {
        input_ids: batch.input_ids.index_select(&index, 0)?,
        attention_mask: batch.attention_mask.index_select(&index, 0)?,
        token_type_ids: batch.token_type_ids.index_select(&index, 0)?,
        labels: batch.labels.index_select(&index, 0)?,
    })
}

/// Row `row` of `output` cut to its first `len` positions, copied into storage of its own (a view,
/// or candle's `copy` of one, would keep the whole batch's buffer alive).
fn cut_row(output: &TaskOutput, row: usize, len: usize) -> Result<TaskOutput> {
    // Logits are `(batch, labels)` (classification) or `(batch, seq, vocab)`.
    let logits = output.logits.get(row)?;
    let logits = if logits.rank() == 2 {
        logits.narrow(0, 0, len)?
    } else {
        logits
    };
    let own = |t: Tensor| -> Result<Tensor> { Ok(t.force_contiguous()?.detach()) };
    let hidden = |t: &Tensor| own(t.get(row)?.narrow(0, 0, len)?);
    let attention = |t: &Tensor| own(t.get(row)?.narrow(1, 0, len)?.narrow(2, 0, len)?);
    Ok(TaskOutput {
        logits: own(logits)?,
        hidden_states: output
            .hidden_states
            .iter()
            .map(hidden)
            .collect::<Result<_>>()?,
        attentions: output
            .attentions
            .iter()
            .map(attention)
            .collect::<Result<_>>()?,
    })
}

/// Stacks cached rows into each frozen model's batch outputs, zero-padded to `seq` positions.
fn assemble(rows: &[&CachedRow], seq: usize) -> Result<Vec<TaskOutput>> {
    let models = rows.first().map_or(0, |r| r.outputs.len());
    (0..models)
        .map(|m| {
            let part = |pick: &dyn Fn(&TaskOutput) -> Result<Tensor>| -> Result<Tensor> {
                let padded = rows
                    .iter()
                    .map(|r| pick(&r.outputs[m]))
                    .collect::<Result<Vec<_>>>()?;
                Tensor::stack(&padded, 0)
            };
            let pad_seq = |t: &Tensor, dims: &[usize]| -> Result<Tensor> {
                let mut t = t.clone();
                for &d in dims {
                    let have = t.dim(d)?;
                    t = t.pad_with_zeros(d, 0, seq - have)?;
                }
                Ok(t)
            };
            let first = &rows[0].outputs[m];
            let logits = if first.logits.rank() == 2 {
                part(&|o| pad_seq(&o.logits, &[0]))?
            } else {
                part(&|o| Ok(o.logits.clone()))?
            };
            let hidden_states = (0..first.hidden_states.len())
                .map(|i| part(&|o| pad_seq(&o.hidden_states[i], &[0])))
                .collect::<Result<_>>()?;
            let attentions = (0..first.attentions.len())
                .map(|i| part(&|o| pad_seq(&o.attentions[i], &[1, 2])))
                .collect::<Result<_>>()?;
            Ok(TaskOutput {
                logits,
                hidden_states,
                attentions,
            })
        })
        .collect()
}
