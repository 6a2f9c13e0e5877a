// route-by-field: a tidegate `transform` plugin in JavaScript.
//
// Publishes each event on `<subject-prefix>.<value of field>` (e.g. cdc.regions.eu) with the
// header `X-Route`; events without the field (or without a document, like deletes) keep the
// pipeline's subject. Config (any other key is refused):
//   subject-prefix  required; must lie under the pipeline's subject prefix
//   field           top-level document field to route on (default "region")
//
// Build: node build.mjs route-by-field.wasm   (componentize-js; see README.md)

import { write } from 'tidegate:plugin/log@0.1.0';
import { entries, get } from 'tidegate:plugin/config@0.1.0';

const decoder = new TextDecoder();
let settings = null;

// A plugin error: thrown, it becomes the `err` of the export's result.
function pluginError(tag, message) {
  return { tag, val: message };
}

const KNOWN_KEYS = ['subject-prefix', 'field'];

function load() {
  if (settings === null) {
    // A misspelt key must never be ignored silently: refuse every key but ours.
    const unknown = entries().map(([key]) => key).filter((key) => !KNOWN_KEYS.includes(key));
    if (unknown.length > 0) {
      const quote = (keys) => keys.map((key) => `\`${key}\``).join(', ');
      const plural = unknown.length === 1 ? '' : 's';
      throw pluginError(
        'invalid-config',
        `unknown config key${plural} ${quote(unknown)} (known keys: ${quote(KNOWN_KEYS)})`,
      );
    }
    const prefix = get('subject-prefix');
    if (!prefix) {
      throw pluginError('invalid-config', '`subject-prefix` is required, e.g. "cdc.regions"');
    }
    settings = { prefix, field: get('field') ?? 'region' };
  }
  return settings;
}

// Subject tokens must not contain `.`, `*`, `>` or blanks.
function token(value) {
  const text = String(value).replace(/[.*>\s]/g, '_');
  return text === '' ? '_' : text;
}

export function init() {
  const { prefix, field } = load();
  write('debug', `route-by-field: ${field} -> ${prefix}.<value>`);
}

export function transform(event) {
  const { prefix, field } = load();
  const bytes = event.fullDocument ?? event.fullDocumentBeforeChange;
  if (bytes === undefined || bytes === null) {
    return [{ event, subject: undefined, headers: [] }];
  }
  let doc;
  try {
    doc = JSON.parse(decoder.decode(bytes));
  } catch (e) {
    throw pluginError('invalid-event', `document is not JSON: ${e}`);
  }
  const value = doc[field];
  if (value === undefined || value === null || typeof value === 'object') {
    return [{ event, subject: undefined, headers: [] }];
  }
  const route = token(value);
  return [{ event, subject: `${prefix}.${route}`, headers: [{ name: 'X-Route', value: route }] }];
}
