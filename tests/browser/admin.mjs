// Drives the operator dashboard in Debian's headless Chromium for tests/api/admin_browser.rs.
// Usage: node admin.mjs <service-url> <admin-password> <dead-event-id> <screenshot-dir>
// Logs in, reads the overview's numbers, lists and opens the dead event, tries a forged CSRF
// token, replays the event and waits for the page to show it delivered; checks that a browser
// without a session is sent to the login page and its POSTs are refused. Prints what it saw as
// JSON and leaves screenshots (login, overview, overview-phone, events, detail, dead, test,
// quality).
import { chromium } from 'playwright-core';

const [base, password, deadId, shots] = process.argv.slice(2);
const result = {};
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  args: ['--no-sandbox', '--disable-dev-shm-usage'],
});
const text = async (page, selector) => (await page.locator(selector).first().innerText()).trim();
try {
  const context = await browser.newContext({ viewport: { width: 1280, height: 900 } });
  const page = await context.newPage();

  // Without a session the dashboard sends the browser to the login page.
  await page.goto(`${base}/admin`);
  result.redirectedTo = new URL(page.url()).pathname;
  await page.screenshot({ path: `${shots}/admin-login.png`, fullPage: true });
  await page.getByLabel('Admin password').fill(password);
  await Promise.all([page.waitForURL(`${base}/admin`), page.getByRole('button', { name: 'Log in' }).click()]);

  result.overview = {
    hourAccepted: await text(page, '[data-metric="hour-accepted"]'),
    hourDelivered: await text(page, '[data-metric="hour-delivered"]'),
    hourDead: await text(page, '[data-metric="hour-dead"]'),
    dayAccepted: await text(page, '[data-metric="day-accepted"]'),
    queued: await text(page, '[data-metric="queued"]'),
    pixelState: await text(page, '.state-running'),
    h1: await text(page, 'h1'),
  };
  await page.screenshot({ path: `${shots}/admin-overview.png`, fullPage: true });

  // The same session on a phone-sized screen.
  const phone = await browser.newContext({
    viewport: { width: 390, height: 844 },
    deviceScaleFactor: 2,
    isMobile: true,
    storageState: await context.storageState(),
  });
  const phonePage = await phone.newPage();
  await phonePage.goto(`${base}/admin`);
  result.phoneScrollWidth = await phonePage.evaluate(() => document.documentElement.scrollWidth);
  await phonePage.screenshot({ path: `${shots}/admin-overview-phone.png`, fullPage: true });
  await phone.close();

  // Events: the list, then only the dead ones, then the dead event's page.
  await page.getByRole('link', { name: 'Events', exact: true }).click();
  await page.waitForURL(/\/admin\/events/);
  result.listed = await page.locator('tbody td.mono a').allInnerTexts();
  await page.screenshot({ path: `${shots}/admin-events.png`, fullPage: true });
  await page.getByLabel('State').selectOption('dead');
  await Promise.all([page.waitForURL(/state=dead/), page.getByRole('button', { name: 'Search' }).click()]);
  result.listedDead = await page.locator('tbody td.mono a').allInnerTexts();
  await Promise.all([page.waitForURL(/\/admin\/events\/[^?]+$/), page.getByRole('link', { name: deadId }).click()]);
  result.detailState = await text(page, '[data-field="state"]');
  result.detailPayloadShown = (await text(page, 'pre')).includes('"user_data"');
  await page.screenshot({ path: `${shots}/admin-detail.png`, fullPage: true });
  const detailUrl = page.url();

  // Dead letters, grouped by reason.
  await page.getByRole('link', { name: 'Dead letters' }).click();
  await page.waitForURL(`${base}/admin/dead`);
  result.deadGroupCount = await text(page, '[data-metric="dead-count"]');
  await page.screenshot({ path: `${shots}/admin-dead.png`, fullPage: true });

  // A forged CSRF token: the replay is refused and the event stays dead.
  await page.goto(detailUrl);
  await page.evaluate(() => {
    document.querySelector('main form input[name="csrf"]').value = 'forged-token';
  });
  const [forged] = await Promise.all([
    page.waitForResponse((r) => r.url().endsWith('/retry')),
    page.getByRole('button', { name: 'Replay this event' }).click(),
  ]);
  result.forgedStatus = forged.status();
  await page.goto(detailUrl);
  result.stateAfterForged = await text(page, '[data-field="state"]');

  // The real replay, and the page showing the event delivered once Meta has it.
  await Promise.all([page.waitForURL(/retried=1/), page.getByRole('button', { name: 'Replay this event' }).click()]);
  result.retryNotice = await text(page, '.notice');
  const deadline = Date.now() + 20000;
  for (;;) {
    result.finalState = await text(page, '[data-field="state"]');
    if (result.finalState === 'delivered' || Date.now() > deadline) break;
    await page.waitForTimeout(200);
    await page.reload();
  }

  // A test event with a test code, and Meta's answer on the page.
  await page.getByRole('link', { name: 'Test event' }).click();
  await page.getByLabel('Event name').selectOption('Lead');
  await page.getByLabel(/Test event code/).fill('TEST2468');
  await Promise.all([page.waitForResponse((r) => r.url().endsWith('/admin/test')), page.getByRole('button', { name: 'Send test event' }).click()]);
  result.testOutcome = await page.locator('[data-outcome]').first().getAttribute('data-outcome');
  await page.screenshot({ path: `${shots}/admin-test.png`, fullPage: true });

  // Match quality: the share of events carrying each key (counted once a second).
  await page.getByRole('link', { name: 'Match quality' }).click();
  await page.waitForURL(`${base}/admin/quality`);
  const qualityDeadline = Date.now() + 10000;
  for (;;) {
    const cell = page.locator('[data-metric="quality-Lead-em"]');
    if ((await cell.count()) > 0 || Date.now() > qualityDeadline) break;
    await page.waitForTimeout(200);
    await page.reload();
  }
  result.qualityLeadEm = await text(page, '[data-metric="quality-Lead-em"]');
  await page.screenshot({ path: `${shots}/admin-quality.png`, fullPage: true });

  // Another browser without a session: pages lead to the login, POSTs are refused.
  const stranger = await browser.newContext();
  const strangerPage = await stranger.newPage();
  await strangerPage.goto(`${base}/admin/events`);
  result.strangerLandedOn = new URL(strangerPage.url()).pathname;
  const post = await stranger.request.post(`${base}/admin/events/${encodeURIComponent(deadId)}/retry`, {
    form: { csrf: 'anything' },
    maxRedirects: 0,
  });
  result.strangerPostStatus = post.status();
  await stranger.close();
} finally {
  await browser.close();
}
console.log(JSON.stringify(result));
