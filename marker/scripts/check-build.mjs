// Rebuild the page into a temporary directory and compare it, file by file
// and byte by byte, with the build committed in the Python package. Exits 1
// and lists the differences when the shipped assets do not match the source.

import { spawnSync } from "node:child_process";
import { mkdtempSync, readdirSync, readFileSync, rmSync, statSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join, relative, resolve } from "node:path";
import { fileURLToPath } from "node:url";

const markerDir = resolve(dirname(fileURLToPath(import.meta.url)), "..");
const shippedDir = resolve(markerDir, "../ampsflow/services/marker/static");

function listFiles(root) {
  const files = [];
  const walk = (dir) => {
    for (const name of readdirSync(dir)) {
      const path = join(dir, name);
      if (statSync(path).isDirectory()) {
        walk(path);
      } else {
        files.push(relative(root, path));
      }
    }
  };
  walk(root);
  return files.sort();
}

const outDir = mkdtempSync(join(tmpdir(), "ampsflow-marker-build-"));
try {
  const build = spawnSync(process.execPath, [join(markerDir, "node_modules/vite/bin/vite.js"), "build", "--logLevel", "warn"], {
    cwd: markerDir,
    env: { ...process.env, MARKER_OUT_DIR: outDir },
    stdio: "inherit",
  });
  if (build.status !== 0) {
    console.error(`check-build: vite build failed (exit ${build.status})`);
    process.exit(1);
  }
  const built = listFiles(outDir);
  let shipped = [];
  try {
    shipped = listFiles(shippedDir);
  } catch (error) {
    console.error(`check-build: cannot read ${shippedDir}: ${error.message}`);
  }
  const problems = [];
  for (const file of built) {
    if (!shipped.includes(file)) {
      problems.push(`missing from the shipped build: ${file}`);
    } else if (!readFileSync(join(outDir, file)).equals(readFileSync(join(shippedDir, file)))) {
      problems.push(`differs from the source build: ${file}`);
    }
  }
  for (const file of shipped) {
    if (!built.includes(file)) {
      problems.push(`not produced by the source build: ${file}`);
    }
  }
  if (problems.length > 0) {
    for (const problem of problems) {
      console.error(`check-build: ${problem}`);
    }
    console.error("check-build: run `npm run build` in marker/ and commit ampsflow/services/marker/static");
    process.exit(1);
  }
  console.log(`check-build: ${built.length} files match ${relative(process.cwd(), shippedDir) || shippedDir}`);
} finally {
  rmSync(outDir, { recursive: true, force: true });
}
