// Drives the admin usage page in headless Chromium and prints what it saw as one JSON line.
// Environment: PROXY_URL, ADMIN_TOKEN, CLIENT_KEY, SCREENSHOT (a .png path), CHROMIUM (binary).
import { chromium } from "playwright-core";

const env = (name) => {
  const v = process.env[name];
  if (!v) throw new Error(`${name} is not set`);
  return v;
};
const base = env("PROXY_URL");
const token = env("ADMIN_TOKEN");
const clientKey = env("CLIENT_KEY");

const browser = await chromium.launch({
  executablePath: env("CHROMIUM"),
  headless: true,
  args: [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
  ],
});
const result = { errors: [], requests: [] };
try {
  const page = await browser.newPage({ viewport: { width: 1100, height: 760 } });
  page.on("pageerror", (e) => result.errors.push(String(e)));
  page.on("console", (m) => { if (m.type() === "error") result.errors.push(m.text()); });
  page.on("request", (r) => result.requests.push(r.url()));

  await page.goto(base + "/admin/");
  // A wrong token first: refused, the form comes back with a message.
  await page.fill("#token", "not-the-token");
  await page.click("#login button[type=submit]");
  await page.waitForFunction(() => document.getElementById("login-error").textContent !== "");
  result.wrongTokenMessage = await page.textContent("#login-error");
  result.errors = result.errors.filter((e) => !e.includes("401"));  // the refused call itself

  await page.fill("#token", token);
  await page.click("#login button[type=submit]");
  const requestsBar = '.fill[data-key="team-a"][data-scope="key"][data-dim="requests"]';
  await page.waitForSelector(requestsBar, { state: "attached" });
  const readBars = () => page.$$eval(".fill", (els) => els.map((e) => ({
    key: e.dataset.key, scope: e.dataset.scope, dim: e.dataset.dim,
    used: Number(e.dataset.used), limit: e.dataset.limit, pct: Number(e.dataset.pct),
    width: e.getBoundingClientRect().width,
  })));
  result.keysShown = await page.$$eval("[data-key-card]", (els) => els.map((e) => e.dataset.keyCard));
  result.before = await readBars();

  // Traffic from outside the page: 5 requests against an RPM of 4, so one is refused.
  result.statuses = [];
  for (let i = 0; i < 5; i++) {
    const r = await fetch(base + "/v1/chat/completions", {
      method: "POST",
      headers: { authorization: "Bearer " + clientKey, "content-type": "application/json" },
      body: JSON.stringify({ model: "gpt-4o", messages: [{ role: "user", content: "hi" }], max_tokens: 50 }),
    });
    result.statuses.push(r.status);
  }
  await page.waitForFunction((sel) => Number(document.querySelector(sel).dataset.used) >= 4,
                             requestsBar, { timeout: 20000 });
  await page.waitForSelector('tr[data-refusal="team-a"]', { timeout: 20000 });
  await page.waitForTimeout(600);  // let the width transition finish before measuring
  result.after = await readBars();
  result.refusalRows = await page.$$eval('tr[data-refusal]', (rows) => rows.map((r) => r.innerText));
  result.tokenKept = (await page.evaluate(() => sessionStorage.getItem("proxyAdminToken"))) === token;
  await page.screenshot({ path: env("SCREENSHOT"), fullPage: true });

  // Reloading the page keeps the token (sessionStorage): no second prompt.
  await page.reload();
  await page.waitForSelector(requestsBar, { state: "attached" });
  result.loginHiddenAfterReload = await page.$eval("#login", (e) => e.hidden);
} finally {
  await browser.close();
}
console.log(JSON.stringify(result));
