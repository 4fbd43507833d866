// One job: live progress and curves from its event stream, the stage table (live from metric
// events, then from report.json), artifacts with downloads, and the job's log.

import { apiFetch, download, followJob, getJson } from './api.js';
import { LineChart } from './charts.js';
import { el, badge, bytes, num, time, notice, errorNotice } from './dom.js';

const TERMINAL = new Set(['succeeded', 'failed', 'cancelled']);
const EVALUATED = /^(.+)\.(accuracy|macro_f1|perplexity)$/;
const MEASURED = /^(.+)\.(accuracy|macro_f1|perplexity|latency_batch1_ms|latency_batch32_ms|throughput_per_s|size_on_disk_bytes|parameters|nonzero_parameters)$/;

export function render(main, params, signal) {
  const id = params.id;
  const view = {
    title: el('h1', {}, 'Job'),
    status: el('span', { id: 'job-status' }),
    meta: el('p', { class: 'meta' }),
    actions: el('div', { class: 'toolbar' }),
    bar: el('progress', { id: 'job-progress', max: 1, value: 0 }),
    progressText: el('span', { id: 'progress-text' }, 'waiting for events…'),
    streamState: el('span', { id: 'stream-state', class: 'muted' }),
    outcome: el('div', { id: 'job-outcome' }),
    stages: el('div', { id: 'stages' }),
    artifacts: el('div', { id: 'artifacts' }, el('p', { class: 'muted' }, 'Artifacts appear when the job has succeeded.')),
    log: el('ol', { id: 'job-log', class: 'log' }),
  };
  const loss = new LineChart('Training loss', 'optimizer step (stages end to end)', 'loss');
  loss.node.id = 'loss-chart';
  const rate = new LineChart('Learning rate', 'optimizer step (stages end to end)', 'learning rate');
  rate.node.id = 'lr-chart';
  const evaluation = new LineChart('Evaluation after each stage', 'stage', 'metric');
  evaluation.node.id = 'eval-chart';

  main.append(
    el('p', {}, el('a', { href: '#/jobs' }, '← all jobs')),
    el('div', { class: 'title-row' }, view.title, view.status),
    view.meta, view.actions,
    el('div', { class: 'progress-row' }, view.bar, view.progressText, view.streamState),
    view.outcome,
    el('section', { class: 'charts' }, loss.node, rate.node, evaluation.node),
    el('h2', {}, 'Stages'), view.stages,
    el('h2', {}, 'Artifacts'), view.artifacts,
    el('h2', {}, 'Log'), view.log,
  );

  const timeline = new Timeline(loss, rate, evaluation);
  const state = { job: null, report: null, finished: false };

  const refresh = async () => {
    try {
      state.job = await getJson(`/v1/jobs/${id}`, { signal });
    } catch (error) {
      if (!signal.aborted) view.outcome.replaceChildren(errorNotice(error));
      return;
    }
    showJob(view, state.job, signal, refresh);
    if (TERMINAL.has(state.job.status) && !state.finished) {
      state.finished = true;
      await showResults(view, state, timeline, signal);
    }
  };

  refresh().then(() => {
    if (!state.job) return;
    followJob(id, {
      signal,
      onEvent: (event) => {
        timeline.add(event);
        if (event.type === 'progress') showProgress(view, event.payload);
        if (event.type === 'log') view.log.append(logLine(event));
        if (event.type === 'stage_started' || event.type === 'stage_finished' || event.type === 'metric') {
          if (!state.report) drawStages(view.stages, timeline.rows(), null, state.job?.result);
        }
        if (!['progress', 'metric', 'log'].includes(event.type)) refresh();
      },
      onState: (s, detail) => {
        view.streamState.textContent = {
          live: '● live', reconnecting: '○ reconnecting…', ended: '', error: `stream: ${detail}`,
        }[s];
      },
    });
  });
}

/**
 * What the events say, in the order they came: curve points (the step count restarts in each
 * stage and in each training run of a stage, so x continues from the last point instead) and
 * each evaluated model's measurements.
 */
class Timeline {
  constructor(loss, rate, evaluation) {
    this.loss = loss;
    this.rate = rate;
    this.evaluation = evaluation;
    this.offset = 0;
    this.lastStep = -1;
    this.maxX = 0;
    this.measured = new Map(); // label → {label, metrics, wall_seconds, acceptance_met}
    this.seen = new Set();
  }

  add(event) {
    if (this.seen.has(event.seq)) return; // a resumed stream may repeat nothing, but be sure
    this.seen.add(event.seq);
    const p = event.payload || {};
    if (event.type === 'stage_started') {
      this.offset = this.maxX;
      this.lastStep = -1;
      this.loss.mark(this.offset, `${p.index + 1}. ${p.stage}`);
    } else if (event.type === 'stage_finished') {
      const row = this.row(`${p.index}-${p.stage}`);
      row.wall_seconds = p.report?.wall_seconds;
      row.acceptance_met = p.report?.acceptance_met;
    } else if (event.type === 'metric') {
      this.metric(p.name, p.value, p.step);
    }
  }

  metric(name, value, step) {
    if (name.startsWith('train.loss') || name === 'train.learning_rate') {
      const s = step ?? this.lastStep + 1;
      if (s <= this.lastStep && name === 'train.loss') this.offset = this.maxX;
      if (name === 'train.loss') this.lastStep = s;
      const x = this.offset + s;
      this.maxX = Math.max(this.maxX, x);
      (name === 'train.learning_rate' ? this.rate : this.loss).add(name, x, value);
      return;
    }
    const measured = MEASURED.exec(name);
    if (!measured) return;
    const [, label, measure] = measured;
    const row = this.row(label);
    row.metrics[measure] = value;
    if (EVALUATED.test(name)) {
      const position = [...this.measured.keys()].indexOf(label);
      if (!this.evaluation.marks.some((m) => m.label === label)) this.evaluation.mark(position, label);
      this.evaluation.add(measure, position, value);
    }
  }

  row(label) {
    if (!this.measured.has(label)) this.measured.set(label, { label, metrics: {} });
    return this.measured.get(label);
  }

  rows() {
    return [...this.measured.values()];
  }
}

function showJob(view, job, signal, refresh) {
  view.title.textContent = job.name;
  view.status.replaceChildren(badge(job.status));
  view.meta.replaceChildren(
    `id ${job.id} · created ${time(job.created_at)}`,
    job.started_at ? ` · started ${time(job.started_at)}` : '',
    job.finished_at ? ` · finished ${time(job.finished_at)}` : '',
    ` · attempt ${job.attempt} of ${job.max_attempts}`,
  );
  if (job.progress) showProgress(view, job.progress);
  if (job.status === 'succeeded') {
    view.bar.value = 1;
    view.progressText.textContent = `all ${job.progress?.stages ?? ''} stages done`.replace('  ', ' ');
  }
  const actions = [];
  if (job.status === 'queued' || job.status === 'running') {
    actions.push(el('button', {
      id: 'cancel-job', type: 'button', disabled: job.cancel_requested,
      onclick: () => act(view, apiFetch(`/v1/jobs/${job.id}/cancel`, { method: 'POST', signal }), refresh),
    }, job.cancel_requested ? 'Cancelling…' : 'Cancel'));
  } else {
    actions.push(el('button', {
      id: 'delete-job', type: 'button',
      onclick: () => act(view, apiFetch(`/v1/jobs/${job.id}`, { method: 'DELETE', signal }), () => {
        location.hash = '#/jobs';
      }),
    }, 'Delete job and its artifacts'));
  }
  view.actions.replaceChildren(...actions);
  if (job.status === 'failed' && job.error) {
    view.outcome.replaceChildren(notice('error', el('strong', {}, `Failed (${job.error.code}): `), job.error.message));
  } else if (job.status === 'succeeded' && job.result) {
    const met = job.result.acceptance_met;
    view.outcome.replaceChildren(notice(met === false ? 'info' : 'ok',
      el('strong', {}, 'Succeeded. '),
      met === null || met === undefined ? 'No acceptance contract. ' : met ? 'The final model meets the contract. ' : 'The final model misses the contract. ',
      job.result.best ? `Best: ${job.result.best}. ` : '',
      job.result.final ? `Final: ${job.result.final}.` : ''));
  } else if (job.status === 'cancelled') {
    view.outcome.replaceChildren(notice('info', 'Cancelled.'));
  }
}

async function act(view, request, then) {
  try {
    await request;
    then();
  } catch (error) {
    view.outcome.replaceChildren(errorNotice(error));
  }
}

function showProgress(view, progress) {
  view.bar.value = progress.fraction ?? 0;
  const parts = [];
  if (progress.stage) parts.push(`stage ${(progress.stage_index ?? 0) + 1}/${progress.stages}: ${progress.stage}`);
  parts.push(`${Math.round((progress.fraction ?? 0) * 100)}%`);
  if (progress.message) parts.push(progress.message);
  if (progress.eta_seconds) parts.push(`about ${Math.round(progress.eta_seconds)} s left`);
  view.progressText.textContent = parts.join(' · ');
}

function logLine(event) {
  const p = event.payload;
  return el('li', { class: `level-${p.level}` }, el('time', {}, time(event.created_at)), ` ${p.level}: ${p.message}`);
}

async function showResults(view, state, timeline, signal) {
  let artifacts = [];
  try {
    artifacts = (await getJson(`/v1/jobs/${state.job.id}/artifacts`, { signal })).artifacts;
  } catch (error) {
    if (!signal.aborted) view.artifacts.replaceChildren(errorNotice(error));
    return;
  }
  drawArtifacts(view, state.job.id, artifacts);
  if (artifacts.some((a) => a.name === 'report.json')) {
    try {
      state.report = await getJson(`/v1/jobs/${state.job.id}/artifacts/report.json`, { signal });
    } catch (error) {
      if (!signal.aborted) view.stages.replaceChildren(errorNotice(error));
      return;
    }
    drawStages(view.stages, [state.report.baseline, ...state.report.stages], state.report, state.job.result);
  } else {
    drawStages(view.stages, timeline.rows(), null, state.job.result);
  }
}

/** The stage table: each row's model against the row before it (the model the stage received). */
function drawStages(container, rows, report, result) {
  if (rows.length === 0) {
    container.replaceChildren(el('p', { class: 'muted' }, 'No stage has been measured yet.'));
    return;
  }
  const lowerIsBetter = rows.some((r) => r.metrics.perplexity !== undefined && r.metrics.perplexity !== null);
  const metric = lowerIsBetter ? 'perplexity' : 'accuracy';
  const change = (before, after, format) => {
    if (after === undefined || after === null) return '—';
    if (before === undefined || before === null) return format(after);
    return `${format(before)} → ${format(after)}`;
  };
  const ms = (v) => `${num(v, 3)} ms`;
  const body = rows.map((row, i) => {
    const before = i > 0 ? rows[i - 1].metrics : {};
    const m = row.metrics;
    const tags = [];
    if (result?.best === row.label) tags.push(el('span', { class: 'tag' }, 'best'));
    if (result?.final === row.label) tags.push(el('span', { class: 'tag' }, 'final'));
    if (result?.reference === row.label) tags.push(el('span', { class: 'tag' }, 'reference'));
    return el('tr', { 'data-stage': row.label },
      el('td', {}, row.label, ...tags),
      el('td', {}, change(before[metric], m[metric], (v) => num(v, 4))),
      el('td', {}, change(before.macro_f1, m.macro_f1, (v) => num(v, 4))),
      el('td', {}, change(before.size_on_disk_bytes, m.size_on_disk_bytes, bytes)),
      el('td', {}, change(before.latency_batch1_ms, m.latency_batch1_ms, ms)),
      el('td', {}, change(before.latency_batch32_ms, m.latency_batch32_ms, ms)),
      el('td', {}, m.parameters === undefined ? '—' : `${num(m.parameters)} (${num(m.nonzero_parameters)} non-zero)`),
      el('td', {}, row.wall_seconds === undefined ? '—' : `${num(row.wall_seconds, 3)} s`),
      el('td', {}, row.acceptance_met === null || row.acceptance_met === undefined ? '—' : row.acceptance_met ? '✓ met' : '✗ missed'));
  });
  container.replaceChildren(
    el('table', { class: 'grid', id: 'stage-table', 'data-source': report ? 'report' : 'events' },
      el('thead', {}, el('tr', {}, ['Stage', metric, 'macro F1', 'Size', 'Latency (batch 1)', 'Latency (batch 32)', 'Parameters', 'Wall time', 'Contract']
        .map((h) => el('th', {}, h)))),
      el('tbody', {}, body)),
    el('p', { class: 'muted' }, report
      ? 'From report.json: each row is the model after the stage, against the model the stage received.'
      : 'Live from the job\'s metric events; report.json replaces this when the job has succeeded.'),
  );
}

function drawArtifacts(view, jobId, artifacts) {
  if (artifacts.length === 0) {
    view.artifacts.replaceChildren(el('p', { class: 'muted' }, 'This job has no artifacts.'));
    return;
  }
  const status = el('div');
  const button = (name, label) => el('button', {
    type: 'button', class: 'link', 'data-artifact': name,
    onclick: async () => {
      try {
        status.replaceChildren();
        await download(jobId, name);
      } catch (error) {
        status.replaceChildren(errorNotice(error));
      }
    },
  }, label ?? name);
  const folders = [...new Set(artifacts.filter((a) => a.name.includes('/')).map((a) => a.name.split('/')[0]))];
  view.artifacts.replaceChildren(
    status,
    folders.length ? el('p', {}, 'Whole folders as one tar: ', folders.map((f) => button(`${f}.tar`, `${f}.tar`))) : null,
    el('table', { class: 'grid', id: 'artifact-table' },
      el('thead', {}, el('tr', {}, ['Name', 'Kind', 'Format', 'Size', 'sha256'].map((h) => el('th', {}, h)))),
      el('tbody', {}, artifacts.map((a) => el('tr', {},
        el('td', {}, button(a.name)),
        el('td', {}, a.kind),
        el('td', {}, a.format),
        el('td', {}, bytes(a.bytes)),
        el('td', { class: 'hash', title: a.sha256 }, `${a.sha256.slice(0, 12)}…`))))),
  );
}
