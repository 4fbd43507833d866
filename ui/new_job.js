// Submitting a job: pick a registered model and dataset, edit the spec as JSON (the API's job
// spec, see openapi.yaml), post it; a refused spec shows the server's reason and field.

import { getJson, postJson } from './api.js';
import { el, notice, errorNotice } from './dom.js';

const TEMPLATE = {
  name: 'my-job',
  model: '',
  task: { type: 'text_classification', dataset: '' },
  pipeline: [
    { type: 'finetune', epochs: 2 },
    { type: 'prune', method: 'magnitude', sparsity: 0.5 },
    { type: 'quantize', scheme: 'int8' },
  ],
  acceptance: { metric: 'accuracy', max_drop: 0.01 },
};

export async function render(main, params, signal) {
  const model = el('select', { id: 'job-model', name: 'model', required: true });
  const dataset = el('select', { id: 'job-dataset', name: 'dataset', required: true });
  const spec = el('textarea', { id: 'job-spec', name: 'spec', rows: 22, spellcheck: 'false' });
  const message = el('div', { id: 'job-message' });
  const form = el('form', { id: 'job-form', class: 'stack' },
    el('label', {}, 'Model ', model),
    el('label', {}, 'Dataset ', dataset),
    el('label', { class: 'wide' }, 'Job spec (JSON; the model and dataset above are written into it)', spec),
    el('div', {}, el('button', { type: 'submit' }, 'Submit job')),
    message);
  main.append(el('h1', {}, 'New job'), form);
  spec.value = JSON.stringify(TEMPLATE, null, 2);

  // The selects write their ids into the spec, so the text is always what gets posted.
  const writeIds = () => {
    try {
      const value = JSON.parse(spec.value);
      value.model = model.value;
      value.task = { ...(value.task || {}), dataset: dataset.value };
      spec.value = JSON.stringify(value, null, 2);
    } catch {
      // Leave text that does not parse alone; submitting says why.
    }
  };
  model.addEventListener('change', writeIds);
  dataset.addEventListener('change', writeIds);

  try {
    const [models, datasets] = await Promise.all([
      getJson('/v1/models?limit=100', { signal }),
      getJson('/v1/datasets?limit=100', { signal }),
    ]);
    model.replaceChildren(...models.models.map((m) => el('option', { value: m.id }, `${m.name} (${m.architecture}, ${m.id.slice(0, 8)})`)));
    dataset.replaceChildren(...datasets.datasets.map((d) => el('option', { value: d.id }, `${d.name} (${d.rows} rows, ${d.id.slice(0, 8)})`)));
    if (!models.models.length || !datasets.datasets.length) {
      message.replaceChildren(notice('info', 'Register a model and a dataset first: ', el('a', { href: '#/register' }, 'Models & datasets')));
    }
    writeIds();
  } catch (error) {
    if (!signal.aborted) message.replaceChildren(errorNotice(error));
  }

  form.addEventListener('submit', async (event) => {
    event.preventDefault();
    let body;
    try {
      body = JSON.parse(spec.value);
    } catch (error) {
      message.replaceChildren(notice('error', `The spec is not JSON: ${error.message}`));
      return;
    }
    try {
      const job = await postJson('/v1/jobs', body);
      location.hash = `#/jobs/${job.id}`;
    } catch (error) {
      message.replaceChildren(errorNotice(error));
    }
  });
}
