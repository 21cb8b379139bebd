//! Landing pages: the public site keys (`[sites.<key>]`) and how the visitor's IP address is
//! found (`CLIENT_IP_SOURCE`), read by [`crate::config::load`].

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::config::Env;
use crate::domain::browser::ClientIpSource;

/// One site: a public key pages send, the origins allowed to send it, what they may send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SiteConfig {
    /// The public site key (not a secret: it is in the page).
    pub key: String,
    /// `https://example.com` origins allowed to send with this key.
    pub origins: Vec<String>,
    /// Event names pages may send.
    pub events: Vec<String>,
    /// Requests a minute from one IP address.
    pub per_ip_per_minute: u32,
    /// Requests a minute for the whole site.
    pub per_site_per_minute: u32,
    /// Fields every event of the site gets unless it has them (`currency`, `custom_data`…).
    pub defaults: serde_json::Map<String, serde_json::Value>,
    /// The pixel (name or id) the site's events go to; the default pixel otherwise.
    pub pixel: Option<String>,
}

/// Sites and the IP trust mode.
#[derive(Debug, Clone)]
pub struct SitesConfig {
    /// Every site.
    pub sites: Vec<SiteConfig>,
    /// Where the visitor's address comes from.
    pub client_ip: ClientIpSource,
}

impl Default for SitesConfig {
    fn default() -> Self {
        Self {
            sites: Vec::new(),
            client_ip: ClientIpSource::Socket,
        }
    }
}

impl SitesConfig {
    /// The site with `key`.
    pub fn get(&self, key: &str) -> Option<&SiteConfig> {
        self.sites.iter().find(|s| s.key == key)
    }
}

/// `[sites.<key>]` in the TOML file.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct FileSite {
    origins: Vec<String>,
    #[serde(default)]
    events: Option<Vec<String>>,
    #[serde(default)]
    per_ip_per_minute: Option<u32>,
    #[serde(default)]
    per_site_per_minute: Option<u32>,
    #[serde(default)]
    defaults: BTreeMap<String, toml::Value>,
    /// The pixel (name or id) of this site's events.
    #[serde(default)]
    pixel: Option<String>,
}

/// Reads the sites and the IP trust mode; problems are appended to `problems`.
pub(crate) fn load(
    env: &Env,
    file_sites: BTreeMap<String, FileSite>,
    problems: &mut Vec<String>,
) -> SitesConfig {
    let hops = match env.get("TRUSTED_PROXY_HOPS") {
        Some(raw) => raw.trim().parse::<usize>().unwrap_or_else(|_| {
            problems.push(format!("TRUSTED_PROXY_HOPS must be a number, got {raw:?}"));
            1
        }),
        None => 1,
    };
    let client_ip = match env.get("CLIENT_IP_SOURCE") {
        Some(raw) => ClientIpSource::parse(&raw, hops).unwrap_or_else(|| {
            problems.push(format!(
                "CLIENT_IP_SOURCE must be socket, x-forwarded-for, cloudflare or x-real-ip, got {raw:?}"
            ));
            ClientIpSource::Socket
        }),
        None => ClientIpSource::Socket,
    };
    let mut sites = Vec::new();
    for (key, file) in file_sites {
        let label = format!("sites.{key}");
        if key.len() < 8
            || !key
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        {
            problems.push(format!(
                "{label}: a site key must be at least 8 letters, digits, _ or -"
            ));
        }
        if file.origins.is_empty() {
            problems.push(format!("{label}.origins must list at least one origin"));
        }
        for origin in &file.origins {
            let valid = url::Url::parse(origin).ok().is_some_and(|u| {
                matches!(u.scheme(), "https" | "http")
                    && u.host().is_some()
                    && u.path() == "/"
                    && u.query().is_none()
            });
            if !valid {
                problems.push(format!(
                    "{label}.origins: {origin:?} is not an origin like https://example.com"
                ));
            }
        }
        for key in file.defaults.keys() {
            if matches!(
                key.as_str(),
                "action_source" | "client_ip_address" | "client_user_agent"
            ) {
                problems.push(format!(
                    "{label}.defaults.{key}: decided by the server for pages; remove it"
                ));
            }
        }
        let events = file.events.unwrap_or_else(|| {
            [
                "PageView",
                "ViewContent",
                "Lead",
                "CompleteRegistration",
                "Contact",
                "Schedule",
                "InitiateCheckout",
                "Purchase",
            ]
            .map(str::to_owned)
            .to_vec()
        });
        sites.push(SiteConfig {
            key,
            origins: file
                .origins
                .iter()
                .map(|o| o.trim_end_matches('/').to_owned())
                .collect(),
            events,
            per_ip_per_minute: file.per_ip_per_minute.unwrap_or(60).max(1),
            per_site_per_minute: file.per_site_per_minute.unwrap_or(6000).max(1),
            pixel: file.pixel,
            defaults: file
                .defaults
                .into_iter()
                .filter_map(|(k, v)| serde_json::to_value(v).ok().map(|v| (k, v)))
                .collect(),
        });
    }
    SitesConfig { sites, client_ip }
}
