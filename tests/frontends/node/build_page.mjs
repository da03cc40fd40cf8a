// Bundles page.jsx (React, @ai-sdk/react, ai from node_modules) into one browser script:
// `node build_page.mjs <outfile>`. Run by the browser test's setup; the bundle is never
// committed.
import { build } from "esbuild";

await build({
  entryPoints: [new URL("./page.jsx", import.meta.url).pathname],
  outfile: process.argv[2],
  bundle: true,
  format: "iife",
  jsx: "automatic",
  target: "es2022",
  define: { "process.env.NODE_ENV": '"production"' },
  logLevel: "error",
});
