// Loads each workflow given on stdin into ComfyUI's real frontend (headless Chromium) and prints what
// the UI would queue: {name: {output, missing}} where missing lists node types the frontend lacks.
// With a third argument (a folder), also saves a screenshot of each loaded graph there as <name>.png.
import { chromium } from 'playwright-core';

const [url, chromiumPath, screenshotDir] = process.argv.slice(2);
let input = '';
for await (const chunk of process.stdin) input += chunk;
const workflows = JSON.parse(input);

const browser = await chromium.launch({
  executablePath: chromiumPath,
  args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
         '--disable-background-networking', '--disable-component-update', '--disable-sync'],
});
try {
  const page = await browser.newPage({ viewport: { width: 1600, height: 900 } });
  await page.goto(url);
  await page.waitForFunction(() => window.app && window.app.graph && window.LiteGraph, null, { timeout: 120000 });
  const results = {};
  for (const [name, workflow] of Object.entries(workflows)) {
    results[name] = await page.evaluate(async (wf) => {
      await window.app.loadGraphData(structuredClone(wf), true, true, null);
      const known = window.LiteGraph.registered_node_types;
      const missing = window.app.graph.nodes.filter((n) => !(n.type in known)).map((n) => n.type);
      const prompt = await window.app.graphToPrompt();
      return { output: prompt.output, missing };
    }, workflow);
    if (screenshotDir) {
      await page.evaluate(() => { window.app.canvas.ds.scale = 0.8; window.app.canvas.ds.offset = [20, 40]; window.app.graph.setDirtyCanvas(true, true); });
      await page.waitForTimeout(500);
      await page.screenshot({ path: `${screenshotDir}/${name}.png` });
    }
  }
  process.stdout.write(JSON.stringify(results));
} finally {
  await browser.close();
}
