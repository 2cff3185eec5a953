// Screenshots of every dashboard page of a running Flywheel, for the
// README: node screenshots.mjs (BASE, ADMIN_USER, PASSWORD, SHOTS in the
// environment). scripts/demo-loop.sh runs it at the end of its real run.
import { chromium } from "playwright-core";

const { BASE, ADMIN_USER, PASSWORD, SHOTS } = process.env;
if (!BASE || !ADMIN_USER || !PASSWORD || !SHOTS) throw new Error("set BASE, ADMIN_USER, PASSWORD and SHOTS");
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: ["--no-sandbox"],
});
try {
  const page = await (await browser.newContext({ viewport: { width: 1280, height: 900 } })).newPage();
  await page.goto(`${BASE}/admin/login`);
  await page.fill("input[name=username]", ADMIN_USER);
  await page.fill("input[name=password]", PASSWORD);
  await page.click("button[type=submit]");
  // Whole pages, but the first screens only of the long ones (an
  // evaluation lists every example).
  const shoot = async (path, name, fullPage = true) => {
    await page.goto(`${BASE}${path}`);
    await page.screenshot({ path: `${SHOTS}/${name}.png`, fullPage, clip: fullPage ? undefined : { x: 0, y: 0, width: 1280, height: 1800 } });
    console.log(`screenshot ${name}: ${path}`);
  };
  // The first detail link of a list page, if it has one.
  const first = async (path, selector) => {
    await page.goto(`${BASE}${path}`);
    const link = page.locator(selector).first();
    return (await link.count()) ? await link.getAttribute("href") : null;
  };
  await shoot("/admin", "overview");
  await page.setViewportSize({ width: 390, height: 844 });
  await shoot("/admin", "overview-phone");
  await page.setViewportSize({ width: 1280, height: 900 });
  const cy = await first("/admin", "table.cycles a");
  if (cy) await shoot(cy, "cycle");
  await shoot("/admin/completions", "completions");
  const c = await first("/admin/completions?rating=corrected", "table.completions a");
  if (c) await shoot(c, "completion");
  await shoot("/admin/datasets", "datasets");
  const d = await first("/admin/datasets", "table.datasets a");
  if (d) await shoot(d, "dataset");
  await shoot("/admin/runs", "runs");
  const r = await first("/admin/runs", "table.runs a");
  if (r) await shoot(r, "run");
  await shoot("/admin/evaluations", "evaluations");
  const e = await first("/admin/evaluations", "table.evaluations a");
  if (e) await shoot(e, "evaluation", false);
  await shoot("/admin/models", "models");
  await shoot("/admin/decisions", "decisions");
  await shoot("/admin/teams", "teams");
} finally {
  await browser.close();
}
