// The dashboard's shell: the API key form and a hash router (#/jobs, #/jobs/<id>, #/new,
// #/compare?ids=…, #/register). Each page module exports `render(main, params, signal)`; the
// signal aborts when the user leaves the page, ending its streams and timers.

import { storedKey, storeKey } from './api.js';
import * as jobs from './jobs.js';
import * as job from './job.js';
import * as newJob from './new_job.js';
import * as compare from './compare.js';
import * as register from './register.js';

const routes = [
  { pattern: /^\/jobs\/([0-9a-f-]{36})$/, page: job, nav: 'jobs' },
  { pattern: /^\/jobs$/, page: jobs, nav: 'jobs' },
  { pattern: /^\/new$/, page: newJob, nav: 'new' },
  { pattern: /^\/compare$/, page: compare, nav: 'compare' },
  { pattern: /^\/register$/, page: register, nav: 'register' },
];

let leave = new AbortController();

function route() {
  const hash = location.hash.replace(/^#/, '') || '/jobs';
  const [path, query = ''] = hash.split('?');
  const match = routes.map((r) => ({ r, m: r.pattern.exec(path) })).find(({ m }) => m);
  if (!match) {
    location.hash = '#/jobs';
    return;
  }
  leave.abort();
  leave = new AbortController();
  for (const link of document.querySelectorAll('nav a')) {
    link.classList.toggle('active', link.dataset.page === match.r.nav);
  }
  const main = document.getElementById('page');
  main.replaceChildren();
  const params = { id: match.m[1], query: new URLSearchParams(query) };
  match.r.page.render(main, params, leave.signal);
}

function showKeyState() {
  const state = document.getElementById('key-state');
  state.textContent = storedKey() ? 'key saved in this browser' : 'no key';
  state.className = storedKey() ? 'saved' : '';
}

function setUpKeyForm() {
  const form = document.getElementById('key-form');
  form.addEventListener('submit', (event) => {
    event.preventDefault();
    const input = document.getElementById('api-key');
    storeKey(input.value.trim());
    input.value = '';
    showKeyState();
    route();
  });
  document.getElementById('key-forget').addEventListener('click', () => {
    storeKey('');
    showKeyState();
    route();
  });
  showKeyState();
}

setUpKeyForm();
window.addEventListener('hashchange', route);
route();
