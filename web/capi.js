/*! capi-bridge browser script: pairs the Meta Pixel with server events. MIT. */
(function (w, d) {
  'use strict';
  var me = d.currentScript;
  var cfg = {
    siteKey: me && me.getAttribute('data-site-key'),
    endpoint: me && (me.getAttribute('data-endpoint') || new URL(me.src).origin + '/v1/collect'),
    consent: !(me && me.getAttribute('data-consent') === 'pending'),
    dataProcessingOptions: null
  };

  function cookie(name) {
    var m = d.cookie.match('(?:^|; )' + name + '=([^;]*)');
    return m ? decodeURIComponent(m[1]) : null;
  }

  function setCookie(name, value, days) {
    d.cookie = name + '=' + encodeURIComponent(value) + '; Max-Age=' + days * 86400 +
      '; Path=/; SameSite=Lax' + (location.protocol === 'https:' ? '; Secure' : '');
  }

  function newId() {
    if (w.crypto && crypto.randomUUID) return crypto.randomUUID();
    return Date.now().toString(36) + '-' + Math.random().toString(36).slice(2, 12);
  }

  // The click id from the URL, kept in a first-party _fbc cookie with the time it was first
  // seen (what Meta wants), unless the Pixel already did. fbclid is never re-cased.
  function click() {
    var fbclid = new URLSearchParams(location.search).get('fbclid');
    var fbc = cookie('_fbc');
    if (fbclid && (!fbc || fbc.split('.')[3] !== fbclid)) {
      fbc = 'fb.1.' + Date.now() + '.' + fbclid;
      if (cfg.consent) setCookie('_fbc', fbc, 90);
    }
    return fbc;
  }

  function send(body) {
    var text = JSON.stringify(body);
    // A text/plain beacon needs no CORS preflight and survives the page unloading.
    try {
      if (navigator.sendBeacon && navigator.sendBeacon(cfg.endpoint, new Blob([text], { type: 'text/plain' }))) return;
    } catch (e) { /* fall through to fetch */ }
    if (w.fetch) {
      fetch(cfg.endpoint, { method: 'POST', body: text, keepalive: true, credentials: 'omit',
        headers: { 'Content-Type': 'text/plain' } }).catch(function () {});
    }
  }

  var PII = { email: 1, phone: 1, first_name: 1, last_name: 1, external_id: 1, city: 1, state: 1, zip: 1, country: 1 };

  w.capiBridge = {
    /** Overrides data-* settings: {siteKey, endpoint}. */
    init: function (options) {
      for (var k in options) if (Object.prototype.hasOwnProperty.call(options, k)) cfg[k] = options[k];
    },
    /** false: send nothing (no consent); true: send. */
    consent: function (granted) { cfg.consent = !!granted; },
    /** Limited Data Use, e.g. (['LDU'], 0, 0); sent with every event. */
    dataProcessingOptions: function (options, country, state) {
      cfg.dataProcessingOptions = { options: options, country: country, state: state };
    },
    /** Sends `name` to the Pixel and to capi-bridge with one event id; returns the id. */
    track: function (name, data, options) {
      if (!cfg.consent) return null;
      data = data || {};
      var id = (options && options.eventID) || newId();
      var pixel = {};
      for (var k in data) if (Object.prototype.hasOwnProperty.call(data, k) && !PII[k]) pixel[k] = data[k];
      if (typeof w.fbq === 'function') w.fbq('track', name, pixel, { eventID: id });
      var fbc = click();
      var body = {
        site_key: cfg.siteKey,
        event_name: name,
        event_id: id,
        event_time: Math.floor(Date.now() / 1000),
        event_source_url: location.href,
        referrer_url: d.referrer || undefined,
        fbc: fbc || undefined,
        fbp: cookie('_fbp') || undefined,
        custom_data: {}
      };
      for (var key in data) {
        if (!Object.prototype.hasOwnProperty.call(data, key)) continue;
        if (PII[key]) body[key] = data[key];
        else if (key === 'value' || key === 'currency') body[key] = data[key];
        else body.custom_data[key] = data[key];
      }
      var dpo = cfg.dataProcessingOptions;
      if (dpo) {
        body.data_processing_options = dpo.options;
        body.data_processing_options_country = dpo.country;
        body.data_processing_options_state = dpo.state;
      }
      send(body);
      return id;
    }
  };
  click();
  var queued = w.capiBridgeQueue || [];
  for (var i = 0; i < queued.length; i++) w.capiBridge.track.apply(null, queued[i]);
})(window, document);
