// Builds plugin.js into a tidegate component:  node build.mjs OUT.wasm
// Needs @bytecodealliance/componentize-js (npm install @bytecodealliance/componentize-js@0.23)
// resolvable from here or from NODE_PATH-style COMPONENTIZE_JS (the package folder).
import { writeFile } from 'node:fs/promises';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';

const here = dirname(fileURLToPath(import.meta.url));
const out = process.argv[2];
if (!out) {
  console.error('usage: node build.mjs OUT.wasm');
  process.exit(2);
}
const pkg = process.env.COMPONENTIZE_JS
  ? pathToFileURL(join(process.env.COMPONENTIZE_JS, 'src/componentize.js')).href
  : '@bytecodealliance/componentize-js';
const { componentize } = await import(pkg);
const { component } = await componentize({
  sourcePath: join(here, 'plugin.js'),
  witPath: process.env.TIDEGATE_WIT ?? join(here, 'wit'),
  worldName: 'transform',
  // Without these the component would import wasi:http and more; tidegate grants none.
  disableFeatures: ['stdio', 'random', 'clocks', 'http', 'fetch-event'],
});
await writeFile(resolve(out), component);
