// Comparing jobs: each chosen job's input model (baseline) and final model, the task metric
// against size on disk and against latency at batch 1, the Pareto front marked on both.

import { getJson } from './api.js';
import { scatterChart, paretoFront } from './charts.js';
import { el, bytes, num, errorNotice } from './dom.js';

const METRICS = {
  accuracy: { label: 'accuracy', higherIsBetter: true },
  macro_f1: { label: 'macro F1', higherIsBetter: true },
  perplexity: { label: 'perplexity', higherIsBetter: false },
};

export async function render(main, params, signal) {
  const chosen = new Set((params.query.get('ids') || '').split(',').filter(Boolean));
  const picker = el('div', { id: 'compare-picker', class: 'picker' });
  const metric = el('select', { id: 'compare-metric' },
    Object.entries(METRICS).map(([key, m]) => el('option', { value: key }, m.label)));
  const charts = el('section', { id: 'compare-charts', class: 'charts' });
  const table = el('div', { id: 'compare-table' });
  const message = el('div');
  main.append(
    el('h1', {}, 'Compare jobs'),
    el('p', { class: 'muted' }, 'Each chosen job gives two points: its input model (baseline) and its final model. ' +
      'A point is on the Pareto front when no other is both smaller (or faster) and at least as good.'),
    message,
    el('div', { class: 'toolbar' }, el('label', {}, 'Metric ', metric)),
    picker, charts, table);

  let jobs = [];
  try {
    jobs = (await getJson('/v1/jobs?status=succeeded&limit=100', { signal })).jobs.filter((j) => j.result?.metrics?.final);
  } catch (error) {
    if (!signal.aborted) message.replaceChildren(errorNotice(error));
    return;
  }
  // The jobs named in the URL may be older than the first page: fetch those one by one.
  for (const id of chosen) {
    if (jobs.some((j) => j.id === id)) continue;
    try {
      const job = await getJson(`/v1/jobs/${id}`, { signal });
      if (job.result?.metrics?.final) jobs.push(job);
    } catch (error) {
      message.append(errorNotice(error));
    }
  }
  const anyHas = (key) => jobs.some((j) => j.result.metrics.final[key] !== undefined && j.result.metrics.final[key] !== null);
  metric.value = anyHas('accuracy') || !anyHas('perplexity') ? 'accuracy' : 'perplexity';

  const draw = () => {
    const picked = jobs.filter((j) => chosen.has(j.id));
    const key = metric.value;
    const points = picked.flatMap((j) => ['baseline', 'final']
      .map((which) => ({ which, m: j.result.metrics[which] }))
      .filter(({ m }) => m && m[key] !== undefined && m[key] !== null)
      .map(({ which, m }) => ({ label: `${j.name} · ${which}`, job: j, metrics: m, y: m[key] })));
    const { label, higherIsBetter } = METRICS[key];
    const bySize = points.map((p) => ({ ...p, x: p.metrics.size_on_disk_bytes }));
    const byLatency = points.filter((p) => p.metrics.latency_batch1_ms !== undefined && p.metrics.latency_batch1_ms !== null)
      .map((p) => ({ ...p, x: p.metrics.latency_batch1_ms }));
    const size = scatterChart(`${label} against size on disk`, 'size on disk', label, bySize, higherIsBetter, bytes);
    size.id = 'pareto-size';
    const latency = scatterChart(`${label} against latency (batch 1)`, 'latency, batch 1 (ms)', label, byLatency, higherIsBetter);
    latency.id = 'pareto-latency';
    charts.replaceChildren(size, latency);
    const onSizeFront = new Set(paretoFront(bySize, higherIsBetter).map((p) => p.label));
    const onLatencyFront = new Set(paretoFront(byLatency, higherIsBetter).map((p) => p.label));
    table.replaceChildren(el('table', { class: 'grid' },
      el('thead', {}, el('tr', {}, ['Model', label, 'Size', 'Latency (batch 1)', 'Pareto (size)', 'Pareto (latency)'].map((h) => el('th', {}, h)))),
      el('tbody', {}, points.map((p) => el('tr', {},
        el('td', {}, el('a', { href: `#/jobs/${p.job.id}` }, p.label)),
        el('td', {}, num(p.y, 4)),
        el('td', {}, bytes(p.metrics.size_on_disk_bytes)),
        el('td', {}, p.metrics.latency_batch1_ms === undefined ? '—' : `${num(p.metrics.latency_batch1_ms, 3)} ms`),
        el('td', {}, onSizeFront.has(p.label) ? '★' : ''),
        el('td', {}, onLatencyFront.has(p.label) ? '★' : ''))))));
    const query = [...chosen].join(',');
    history.replaceState(null, '', `#/compare${query ? `?ids=${query}` : ''}`);
  };

  picker.replaceChildren(jobs.length
    ? el('fieldset', {}, el('legend', {}, 'Succeeded jobs'), jobs.map((j) => {
      const box = el('input', { type: 'checkbox', value: j.id, checked: chosen.has(j.id) });
      box.addEventListener('change', () => {
        if (box.checked) chosen.add(j.id);
        else chosen.delete(j.id);
        draw();
      });
      return el('label', { class: 'inline' }, box, ` ${j.name} `, el('small', {}, j.id.slice(0, 8)));
    }))
    : el('p', { class: 'muted' }, 'No succeeded job yet.'));
  metric.addEventListener('change', draw);
  draw();
}
