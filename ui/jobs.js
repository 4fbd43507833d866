// The jobs list: newest first, filtered by status (on the server) and by a name search (over the
// loaded pages), more pages on demand, refreshed every few seconds while jobs are active.
// Ticked rows open the comparison page.

import { getJson } from './api.js';
import { el, badge, bytes, num, time, errorNotice } from './dom.js';

const STATUSES = ['queued', 'running', 'succeeded', 'failed', 'cancelled'];
const REFRESH_MS = 3000;

export function render(main, params, signal) {
  const status = el('select', { id: 'filter-status', name: 'status' },
    el('option', { value: '' }, 'any status'),
    STATUSES.map((s) => el('option', { value: s }, s)));
  status.value = params.query.get('status') || '';
  const search = el('input', { id: 'filter-name', type: 'search', placeholder: 'name contains…' });
  search.value = params.query.get('q') || '';
  const compareButton = el('button', { id: 'compare-selected', type: 'button', disabled: true }, 'Compare selected');
  const body = el('tbody');
  const more = el('button', { id: 'more-jobs', type: 'button', hidden: true }, 'Load more');
  const message = el('div');
  main.append(
    el('h1', {}, 'Jobs'),
    el('div', { class: 'toolbar' }, status, search, compareButton, el('a', { class: 'button', href: '#/new' }, 'New job')),
    message,
    el('table', { id: 'jobs', class: 'grid' },
      el('thead', {}, el('tr', {}, ['', 'Name', 'Status', 'Progress', 'Created', 'Final metric', 'Final size'].map((h) => el('th', {}, h)))),
      body),
    more,
  );

  let jobs = [];
  let next = null;
  const ticked = new Set();

  const draw = () => {
    const needle = search.value.trim().toLowerCase();
    const shown = jobs.filter((j) => !needle || j.name.toLowerCase().includes(needle) || j.id.startsWith(needle));
    body.replaceChildren(...shown.map((j) => row(j, ticked, () => {
      compareButton.disabled = ticked.size === 0;
    })));
    if (shown.length === 0) {
      body.append(el('tr', {}, el('td', { colspan: 7, class: 'empty' }, jobs.length ? 'no job matches the search' : 'no jobs')));
    }
    more.hidden = next === null;
  };

  const load = async (append) => {
    const query = new URLSearchParams({ limit: '50' });
    if (status.value) query.set('status', status.value);
    if (append && next) query.set('after', next);
    try {
      const page = await getJson(`/v1/jobs?${query}`, { signal });
      jobs = append ? jobs.concat(page.jobs) : page.jobs;
      if (!append) next = page.next;
      else next = page.next;
      message.replaceChildren();
    } catch (error) {
      if (signal.aborted) return;
      message.replaceChildren(errorNotice(error));
    }
    draw();
  };

  status.addEventListener('change', () => {
    const query = new URLSearchParams();
    if (status.value) query.set('status', status.value);
    if (search.value) query.set('q', search.value);
    history.replaceState(null, '', `#/jobs${query.size ? `?${query}` : ''}`);
    load(false);
  });
  search.addEventListener('input', draw);
  more.addEventListener('click', () => load(true));
  compareButton.addEventListener('click', () => {
    location.hash = `#/compare?ids=${[...ticked].join(',')}`;
  });

  load(false);
  // Keep statuses and progress current while something may still change (first page only).
  const timer = setInterval(() => {
    if (next === null && jobs.some((j) => j.status === 'queued' || j.status === 'running')) load(false);
  }, REFRESH_MS);
  signal.addEventListener('abort', () => clearInterval(timer));
}

function row(job, ticked, onTick) {
  const box = el('input', { type: 'checkbox', 'aria-label': `compare ${job.name}`, checked: ticked.has(job.id) });
  box.addEventListener('change', () => {
    if (box.checked) ticked.add(job.id);
    else ticked.delete(job.id);
    onTick();
  });
  const final = job.result?.metrics?.final || {};
  const metric = final.accuracy !== undefined && final.accuracy !== null
    ? `accuracy ${num(final.accuracy, 3)}`
    : final.perplexity !== undefined && final.perplexity !== null ? `perplexity ${num(final.perplexity, 4)}` : '—';
  const progress = job.status === 'running' && job.progress
    ? el('progress', { max: 1, value: job.progress.fraction ?? 0 })
    : job.status === 'succeeded' ? '100%' : '';
  return el('tr', { 'data-job': job.id, 'data-status': job.status },
    el('td', {}, box),
    el('td', {}, el('a', { href: `#/jobs/${job.id}` }, job.name)),
    el('td', {}, badge(job.status)),
    el('td', {}, progress),
    el('td', {}, time(job.created_at)),
    el('td', {}, metric),
    el('td', {}, final.size_on_disk_bytes !== undefined ? bytes(final.size_on_disk_bytes) : '—'));
}
