// The SDK as a page ships it: every module bundled into one ES module,
// minified (esbuild), then gzipped (level 9). Prints both sizes in bytes;
// `npm run size`. docs/sdk-typescript.md reports the figure.

import { buildSync } from "esbuild";
import { gzipSync } from "node:zlib";

/** Minified and gzipped sizes of the bundled SDK, in bytes. */
export function sdkSize() {
  const out = buildSync({
    entryPoints: [new URL("../src/index.ts", import.meta.url).pathname],
    bundle: true,
    minify: true,
    format: "esm",
    target: "es2020",
    write: false,
  });
  const code = out.outputFiles[0].contents;
  return { minified: code.length, gzipped: gzipSync(code, { level: 9 }).length };
}

if (import.meta.url === `file://${process.argv[1]}`) {
  const { minified, gzipped } = sdkSize();
  console.log(`@switchboard/client: ${minified} B minified, ${gzipped} B minified and gzipped`);
}
