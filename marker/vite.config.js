import react from "@vitejs/plugin-react";
import { defineConfig } from "vite";

// The build is committed inside the Python package (ampsflow/services/marker/static)
// and `npm run check-build` rebuilds it to compare byte for byte, so the
// output must depend only on the sources and the lockfile: content-hashed
// names, no sourcemaps (they embed absolute paths), no build-time stamps.
export default defineConfig({
  plugins: [react()],
  base: "/",
  build: {
    outDir: process.env.MARKER_OUT_DIR ?? "../ampsflow/services/marker/static",
    emptyOutDir: true,
    assetsDir: "assets",
    sourcemap: false,
    target: "es2020",
    reportCompressedSize: false,
    modulePreload: { polyfill: false },
    rolldownOptions: {
      onwarn(warning, warn) {
        // amps.js reaches `eval("require")` only under Node/Electron to load
        // the `websocket` package; in the browser it uses the native WebSocket.
        if (warning.code === "EVAL" && /node_modules\/amps\//.test(warning.id ?? "")) {
          return;
        }
        warn(warning);
      },
    },
  },
  server: {
    // `npm run dev` against a running `ampsflow marker` on :8080 for the proxies.
    proxy: {
      "/config.json": "http://127.0.0.1:8080",
      "/v1/traces": "http://127.0.0.1:8080",
      "/amps/json": { target: "ws://127.0.0.1:8080", ws: true },
    },
  },
  test: {
    environment: "node",
    include: ["test/**/*.test.js"],
  },
});
