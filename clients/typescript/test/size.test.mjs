// The SDK stays small: bundled, minified and gzipped it is under 12 KB
// (the aim); `npm run size` prints the figure.

import { test } from "node:test";
import assert from "node:assert/strict";
import { sdkSize } from "../scripts/size.mjs";

test("the bundled SDK is under 12 KB minified and gzipped", () => {
  const { minified, gzipped } = sdkSize();
  assert.ok(gzipped < 12 * 1024, `${gzipped} B minified and gzipped (${minified} B minified)`);
});
