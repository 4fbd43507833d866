// Registering models and datasets, by upload (multipart, as `curl -F` does) or by reference
// (file://, s3://, hf:// URIs), and the registered ones listed. Empty fields are left out, so
// the server's defaults apply.

import { getJson, postForm, postJson } from './api.js';
import { el, bytes, num, time, notice, errorNotice } from './dom.js';

export function render(main, params, signal) {
  const models = el('div', { id: 'model-list' });
  const datasets = el('div', { id: 'dataset-list' });
  const reload = () => {
    list('/v1/models?limit=100', 'models', models, modelRow, signal);
    list('/v1/datasets?limit=100', 'datasets', datasets, datasetRow, signal);
  };

  main.append(
    el('h1', {}, 'Models & datasets'),
    el('div', { class: 'columns' },
      el('section', {},
        el('h2', {}, 'Register a model'),
        modelUpload(reload),
        modelReference(reload)),
      el('section', {},
        el('h2', {}, 'Register a dataset'),
        datasetUpload(reload),
        datasetReference(reload))),
    el('h2', {}, 'Models'), models,
    el('h2', {}, 'Datasets'), datasets,
  );
  reload();
}

/** A form whose submit runs `send(formElement)` and shows the registered record or the problem. */
function registrationForm(id, title, fields, send, describe, reload) {
  const message = el('div', { class: 'form-message' });
  const form = el('form', { id, class: 'stack card' }, el('h3', {}, title), ...fields,
    el('div', {}, el('button', { type: 'submit' }, 'Register')), message);
  form.addEventListener('submit', async (event) => {
    event.preventDefault();
    const button = form.querySelector('button[type=submit]');
    button.disabled = true;
    message.replaceChildren(notice('info', 'Checking every file…'));
    try {
      const record = await send(form);
      message.replaceChildren(notice('ok', el('strong', {}, 'Registered '), describe(record), ' · id ',
        el('code', { class: 'registered-id' }, record.id)));
      form.reset();
      reload();
    } catch (error) {
      message.replaceChildren(errorNotice(error));
    } finally {
      button.disabled = false;
    }
  });
  return form;
}

function text(name, label, attrs = {}) {
  return el('label', {}, label, el('input', { name, type: 'text', ...attrs }));
}

function modelUpload(reload) {
  return registrationForm('model-upload', 'Upload a model folder', [
    text('name', 'Name (optional)'),
    el('label', {}, 'Files: config.json, *.safetensors, tokenizer files; or one .gguf (with an optional tokenizer.json)',
      el('input', { name: 'file', type: 'file', multiple: true, required: true })),
  ], (form) => {
    const data = new FormData();
    const name = form.elements.name.value.trim();
    if (name) data.append('name', name);
    for (const file of form.elements.file.files) data.append('file', file, file.name);
    return postForm('/v1/models', data);
  }, (m) => `${m.name}: ${m.architecture}, ${num(m.parameters)} parameters, ${bytes(m.bytes)}`, reload);
}

function modelReference(reload) {
  return registrationForm('model-reference', 'Or point at a model', [
    text('name', 'Name (optional)'),
    text('uri', 'URI', { required: true, placeholder: 'hf://org/name@main · s3://bucket/folder/ · file:///…' }),
  ], (form) => {
    const body = { uri: form.elements.uri.value.trim() };
    const name = form.elements.name.value.trim();
    if (name) body.name = name;
    return postJson('/v1/models', body);
  }, (m) => `${m.name}: ${m.architecture}, ${num(m.parameters)} parameters, ${bytes(m.bytes)}`, reload);
}

/** Dataset options shared by upload and reference: format, fields, strictness. */
function datasetOptions() {
  return [
    text('name', 'Name (optional)'),
    el('label', {}, 'Format ', el('select', { name: 'format' },
      el('option', { value: '' }, 'from the file extension'),
      ['jsonl', 'csv', 'text'].map((f) => el('option', { value: f }, f)))),
    text('text_field', 'Text field', { placeholder: 'text' }),
    text('label_field', 'Label field', { placeholder: 'label' }),
    el('label', { class: 'inline' }, el('input', { name: 'strict', type: 'checkbox', checked: true }),
      ' strict (the first bad row refuses the file; unticked, bad rows are skipped and reported)'),
  ];
}

function datasetFields(form) {
  const fields = {};
  for (const name of ['name', 'format', 'text_field', 'label_field']) {
    const value = form.elements[name].value.trim();
    if (value) fields[name] = value;
  }
  fields.strict = form.elements.strict.checked;
  return fields;
}

function describeDataset(d) {
  const splits = Object.entries(d.splits || {}).map(([s, n]) => `${s} ${n}`).join(', ');
  return `${d.name}: ${d.rows} rows (${splits}), ${d.rejected} rejected, ${bytes(d.bytes)}`;
}

function datasetUpload(reload) {
  return registrationForm('dataset-upload', 'Upload a dataset file', [
    ...datasetOptions(),
    el('label', {}, 'File (.jsonl, .csv or .txt)', el('input', { name: 'file', type: 'file', required: true })),
  ], (form) => {
    const data = new FormData();
    // Options go before the file part: the server reads them first.
    for (const [name, value] of Object.entries(datasetFields(form))) data.append(name, String(value));
    const [file] = form.elements.file.files;
    data.append('file', file, file.name);
    return postForm('/v1/datasets', data);
  }, describeDataset, reload);
}

function datasetReference(reload) {
  return registrationForm('dataset-reference', 'Or point at a dataset', [
    text('uri', 'URI', { required: true, placeholder: 'hf://datasets/org/name@main/file.jsonl · s3://… · file:///…' }),
    ...datasetOptions(),
  ], (form) => postJson('/v1/datasets', { uri: form.elements.uri.value.trim(), ...datasetFields(form) }),
  describeDataset, reload);
}

async function list(path, key, container, row, signal) {
  try {
    const page = await getJson(path, { signal });
    const items = page[key];
    container.replaceChildren(items.length
      ? el('table', { class: 'grid' }, el('tbody', {}, items.map(row)))
      : el('p', { class: 'muted' }, `No ${key} yet.`));
  } catch (error) {
    if (!signal.aborted) container.replaceChildren(errorNotice(error));
  }
}

function modelRow(m) {
  return el('tr', { 'data-model': m.id },
    el('td', {}, m.name), el('td', {}, `${m.architecture} · ${m.format}`),
    el('td', {}, `${num(m.parameters)} parameters`), el('td', {}, bytes(m.bytes)),
    el('td', {}, m.source), el('td', {}, time(m.created_at)), el('td', {}, el('code', {}, m.id)));
}

function datasetRow(d) {
  return el('tr', { 'data-dataset': d.id },
    el('td', {}, d.name), el('td', {}, d.format), el('td', {}, `${d.rows} rows`),
    el('td', {}, Object.keys(d.label_counts || {}).length ? `${Object.keys(d.label_counts).length} labels` : 'no labels'),
    el('td', {}, bytes(d.bytes)), el('td', {}, d.source), el('td', {}, time(d.created_at)), el('td', {}, el('code', {}, d.id)));
}
