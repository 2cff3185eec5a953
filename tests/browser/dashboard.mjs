// The admin dashboard in a real headless Chromium (Debian's, driven by
// playwright-core). Run by tests/tests/dashboard.rs, which starts the
// gateway, makes the accounts and the traffic, and passes them in:
//   BASE, ADMIN_USER, LOCK_USER, PASSWORD, TEAM, CANDIDATE, BASE_MODEL,
//   COMPLETION_ID, SHOTS (the screenshots' folder), CHROMIUM (optional).
// Each step prints a line; the first failed check stops the run with a
// non-zero exit.
import { chromium } from "playwright-core";
import assert from "node:assert/strict";

const env = (k) => {
  const v = process.env[k];
  if (!v) throw new Error(`${k} is not set`);
  return v;
};
const BASE = env("BASE");
const PASSWORD = env("PASSWORD");
const TEAM = env("TEAM");
const CANDIDATE = env("CANDIDATE");
const BASE_MODEL = env("BASE_MODEL");
const SHOTS = env("SHOTS");
const step = (m) => console.log(`browser: ${m}`);

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: ["--no-sandbox"],
});
try {
  const context = await browser.newContext({ viewport: { width: 1280, height: 900 } });
  const page = await context.newPage();
  const shot = (name, opts = {}) => page.screenshot({ path: `${SHOTS}/${name}.png`, fullPage: true, ...opts });

  // No session: every page sends the browser to sign in.
  await page.goto(`${BASE}/admin/models`);
  assert.match(page.url(), /\/admin\/login\?next=\/admin\/models$/);
  await shot("login");
  step("without a session /admin/models sends the browser to sign in");

  // Repeated bad passwords lock the account, even for the right one.
  for (let i = 0; i < 5; i++) {
    await page.fill("input[name=username]", env("LOCK_USER"));
    await page.fill("input[name=password]", "not the password");
    await page.click("button[type=submit]");
  }
  await page.fill("input[name=username]", env("LOCK_USER"));
  await page.fill("input[name=password]", PASSWORD);
  await page.click("button[type=submit]");
  assert.match(await page.textContent("#login-error"), /locked for \d+ more minute/);
  assert.match(page.url(), /\/admin\/login$/);
  step("five bad passwords lock the account; the right one is then refused");

  // Sign in; the overview's charts and their table.
  await page.goto(`${BASE}/admin/login?next=/admin`);
  await page.fill("input[name=username]", env("ADMIN_USER"));
  await page.fill("input[name=password]", PASSWORD);
  await page.click("button[type=submit]");
  assert.equal(new URL(page.url()).pathname, "/admin");
  const team = page.locator(`section.team[id="team-${TEAM}"]`);
  assert.equal(await team.locator("svg.chart").count(), 2);
  assert.ok((await team.locator("svg.chart circle").count()) > 0, "points on the chart");
  assert.equal(await team.locator(".champion").textContent(), BASE_MODEL);
  assert.ok((await team.locator("table.numbers tbody tr").count()) > 0);
  await shot("overview");
  await page.setViewportSize({ width: 390, height: 844 });
  await shot("overview-phone");
  await page.setViewportSize({ width: 1280, height: 900 });
  step("signed in: the overview shows two charts and their numbers");

  // A completion with its votes; the markup users typed is text, not DOM.
  await page.goto(`${BASE}/admin/completions`);
  await shot("completions");
  await page.click(`a[href="/admin/completions/${env("COMPLETION_ID")}"]`);
  assert.ok((await page.locator("tr.vote").count()) >= 1, "its votes are listed");
  assert.equal(await page.locator("main script, main img").count(), 0, "no injected element");
  const text = await page.textContent("main");
  assert.ok(text.includes("<script>alert('pwned')</script>"), "the script is shown as text");
  assert.ok(text.includes('"><img src=x onerror=alert(1)>'), "the img is shown as text");
  const dialogs = [];
  page.on("dialog", (d) => { dialogs.push(d.message()); d.dismiss(); });
  await page.reload();
  assert.deepEqual(dialogs, [], "no script ran");
  await shot("completion");
  step("a completion shows its conversation and votes, the markup in them as text");

  // Promote with a reason; the audit log shows it.
  await page.goto(`${BASE}/admin/models`);
  const promote = page.locator(`form[id="promote-${TEAM}"]`);
  await promote.locator("select[name=model]").selectOption(CANDIDATE);
  await promote.locator("input[name=reason]").fill("better on routing in the browser test");
  await promote.locator("input[name=confirm]").check();
  await promote.locator("button[type=submit]").click();
  assert.match(await page.textContent("#done"), new RegExp(`${CANDIDATE} is now team ${TEAM}'s champion`));
  assert.equal(await page.locator(`section[id="models-${TEAM}"] .champion`).textContent(), CANDIDATE);
  await shot("models");
  await page.goto(`${BASE}/admin/decisions`);
  const first = page.locator("tr.decision").first();
  assert.equal(await first.locator(".kind").textContent(), "manual_promote");
  assert.equal(await first.locator(".reason").textContent(), "better on routing in the browser test");
  await shot("decisions");
  step("promoted from the models page; the audit log has the reason");

  // Roll back.
  await page.goto(`${BASE}/admin/models`);
  const rollback = page.locator(`form[id="rollback-${TEAM}"]`);
  await rollback.locator("input[name=reason]").fill("rolled back in the browser test");
  await rollback.locator("input[name=confirm]").check();
  await rollback.locator("button[type=submit]").click();
  assert.match(await page.textContent("#done"), new RegExp(`${BASE_MODEL} is the champion again`));
  assert.equal(await page.locator(`section[id="models-${TEAM}"] .champion`).textContent(), BASE_MODEL);
  step("rolled back from the models page");

  // A form without its CSRF token is refused.
  await page.evaluate((t) => {
    document.querySelector(`form[id="promote-${t}"] input[name=csrf]`).remove();
  }, TEAM);
  const forged = page.locator(`form[id="promote-${TEAM}"]`);
  await forged.locator("input[name=reason]").fill("forged");
  await forged.locator("input[name=confirm]").check();
  const [resp] = await Promise.all([
    page.waitForResponse((r) => r.url().endsWith("/admin/models/promote")),
    forged.locator("button[type=submit]").click(),
  ]);
  assert.equal(resp.status(), 403);
  assert.match(await page.textContent("#error-message"), /CSRF token is missing/);
  step("a form without its CSRF token is refused with 403");

  await page.goto(`${BASE}/admin/teams`);
  assert.ok((await page.locator("tr.team-row").count()) >= 2);
  await shot("teams");

  // Sign out: the pages are closed again.
  await page.goto(`${BASE}/admin`);
  await page.click("form.who button");
  await page.goto(`${BASE}/admin`);
  assert.match(page.url(), /\/admin\/login/);
  step("signed out: the overview sends the browser to sign in again");
} finally {
  await browser.close();
}
