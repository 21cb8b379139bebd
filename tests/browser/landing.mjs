// Drives the example landing page in Debian's headless Chromium for tests/api/browser.rs.
// Usage: node landing.mjs <scenario> <page-url>
//   submit: fill the form, click Send; print {fbqCalls, eventId, userAgent, collect: [statuses]}
//   unload: track a PageView from a pagehide handler, then navigate away (sendBeacon on unload)
//   noconsent: consent refused, then track: print {eventId, sent, cookies}
//   pending: the script tag says data-consent="pending"; track, grant consent, track again
import { chromium } from 'playwright-core';

const [scenario, pageUrl] = process.argv.slice(2);
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  args: ['--no-sandbox', '--disable-dev-shm-usage'],
});
try {
  const context = await browser.newContext();
  const page = await context.newPage();
  const collect = [];
  page.on('response', (r) => { if (r.url().includes('/v1/collect')) collect.push(r.status()); });
  // No internet: the Pixel's library is a stub that records what the page gives it.
  await page.route('**/fbevents.js', (route) => route.fulfill({
    contentType: 'text/javascript',
    body: `window.fbqCalls = [];
      fbq.callMethod = function () { window.fbqCalls.push([].slice.call(arguments)); };
      fbq.queue.forEach(function (args) { fbq.callMethod.apply(null, args); });`,
  }));
  await page.goto(pageUrl);
  await page.waitForFunction(() => window.capiBridge && window.fbqCalls);
  const userAgent = await page.evaluate(() => navigator.userAgent);
  if (scenario === 'submit') {
    await page.fill('#email', 'Visitor.Browser@Example.com');
    await page.fill('#phone', '+1 650 555 0100');
    await page.click('#submit');
    await page.waitForSelector('#thanks:not([hidden])');
    const eventId = await page.$eval('#thanks', (el) => el.dataset.eventId);
    const fbqCalls = await page.evaluate(() => window.fbqCalls);
    // Give the beacon its answer (the test waits on the Graph stand-in, not on this).
    await page.waitForResponse((r) => r.url().includes('/v1/collect'), { timeout: 10000 }).catch(() => {});
    console.log(JSON.stringify({ eventId, fbqCalls, userAgent, collect }));
  } else if (scenario === 'unload') {
    // The event is sent while the page goes away: only a beacon survives that.
    const eventId = 'unload-' + Date.now();
    await page.evaluate((id) => {
      window.addEventListener('pagehide', () => capiBridge.track('PageView', {}, { eventID: id }));
    }, eventId);
    // Playwright may not report a beacon sent during unload: keep the browser open (up to
    // 3 s) so that it can leave; the Rust test then waits for it at the Graph stand-in.
    const sent = context.waitForEvent('request', { predicate: (r) => r.url().includes('/v1/collect'), timeout: 3000 })
      .then((r) => r.response()).then((r) => (r ? r.status() : null)).catch(() => null);
    await page.goto('about:blank');
    const status = await sent;
    console.log(JSON.stringify({ eventId, userAgent, collect: [status] }));
  } else if (scenario === 'noconsent') {
    // A consent banner said no: the script sends nothing and sets no cookie.
    const sent = [];
    context.on('request', (r) => { if (r.url().includes('/v1/collect')) sent.push(r.url()); });
    const eventId = await page.evaluate(() => {
      capiBridge.consent(false);
      return capiBridge.track('Lead', { email: 'no.consent@example.com' });
    });
    const cookies = await context.cookies();
    console.log(JSON.stringify({ eventId, sent, cookies: cookies.map((c) => c.name) }));
  } else if (scenario === 'pending') {
    // The page loads with data-consent="pending": nothing is sent and no cookie is set until
    // the banner grants consent.
    const before = await page.evaluate(() => capiBridge.track('Lead', { email: 'later@example.com' }));
    const cookiesBefore = (await context.cookies()).map((c) => c.name);
    const eventId = await page.evaluate(() => {
      capiBridge.consent(true);
      return capiBridge.track('Lead', { email: 'later@example.com' });
    });
    await page.waitForResponse((r) => r.url().includes('/v1/collect'), { timeout: 10000 }).catch(() => {});
    const cookiesAfter = (await context.cookies()).map((c) => c.name);
    console.log(JSON.stringify({ before, cookiesBefore, eventId, cookiesAfter, collect }));
  } else {
    throw new Error('unknown scenario ' + scenario);
  }
} finally {
  await browser.close();
}
