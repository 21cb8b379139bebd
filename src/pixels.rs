//! The pixels (datasets) events go to. One instance may serve several ad accounts: each
//! `[pixels.<name>]` has its own id, token (by environment variable name), app secret, test
//! event code and API version. The original single-pixel setup (`META_PIXEL_ID` +
//! `META_ACCESS_TOKEN`) is the pixel named `default`. No pixel at all is dry-run.
//!
//! A request chooses a pixel by name or id (the `X-Capi-Pixel` header, a `pixel` field, a
//! rule's or a site's `pixel`); without a choice it goes to the default pixel.

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::config::{Env, MetaConfig};

/// The name of the pixel configured by `META_PIXEL_ID`.
pub const DEFAULT_NAME: &str = "default";

/// `[pixels.<name>]` in the TOML file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FilePixel {
    /// Pixel or dataset id (numeric).
    pub pixel_id: Option<String>,
    /// The environment variable holding the token (default `META_ACCESS_TOKEN_<NAME>`).
    pub access_token_env: Option<String>,
    /// The environment variable holding the app secret (default `META_APP_SECRET_<NAME>`,
    /// optional).
    pub app_secret_env: Option<String>,
    /// Sends every event of this pixel to Events Manager's Test Events tab.
    pub test_event_code: Option<String>,
    /// Graph API version for this pixel (default `META_API_VERSION`).
    pub api_version: Option<String>,
}

/// The configured pixels; empty means dry-run.
#[derive(Clone, Default)]
pub struct Pixels {
    list: Vec<MetaConfig>,
    default: Option<usize>,
}

impl std::fmt::Debug for Pixels {
    // Names and ids only: never a token.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_map()
            .entries(self.list.iter().map(|p| (&p.name, &p.pixel_id)))
            .finish()
    }
}

/// Why a request's pixel choice cannot be served.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PixelChoiceError {
    /// No pixel has that name or id.
    #[error("unknown pixel {wanted:?}; configured: {known}")]
    Unknown {
        /// What the request asked for.
        wanted: String,
        /// The configured names.
        known: String,
    },
    /// Several pixels and no default: the request must say which.
    #[error("several pixels are configured ({known}) and none is the default: choose one with the X-Capi-Pixel header or a \"pixel\" field (or set default_pixel)")]
    NoDefault {
        /// The configured names.
        known: String,
    },
}

impl Pixels {
    /// Pixels in configuration order.
    pub fn iter(&self) -> impl Iterator<Item = &MetaConfig> {
        self.list.iter()
    }

    /// True when no pixel is configured (dry-run).
    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    /// How many.
    pub fn len(&self) -> usize {
        self.list.len()
    }

    /// The pixel events go to when they do not choose one.
    pub fn default_pixel(&self) -> Option<&MetaConfig> {
        self.default.and_then(|i| self.list.get(i))
    }

    /// A pixel by name or numeric id.
    pub fn find(&self, wanted: &str) -> Option<&MetaConfig> {
        let wanted = wanted.trim();
        self.list
            .iter()
            .find(|p| p.name == wanted)
            .or_else(|| self.list.iter().find(|p| p.pixel_id == wanted))
    }

    /// The pixel id events choosing `wanted` are stored under. In dry-run every choice is
    /// accepted and stored under no pixel (nothing is sent).
    ///
    /// # Errors
    /// An unknown pixel, or no choice when there is no default.
    pub fn resolve(&self, wanted: Option<&str>) -> Result<&str, PixelChoiceError> {
        if self.list.is_empty() {
            return Ok("");
        }
        let found = match wanted.map(str::trim).filter(|w| !w.is_empty()) {
            Some(wanted) => self.find(wanted).ok_or_else(|| PixelChoiceError::Unknown {
                wanted: wanted.to_owned(),
                known: self.names(),
            })?,
            None => self
                .default_pixel()
                .ok_or_else(|| PixelChoiceError::NoDefault {
                    known: self.names(),
                })?,
        };
        Ok(found.pixel_id.as_str())
    }

    /// Checks that a configured choice (a rule's, a site's, a source's) names a pixel; in
    /// dry-run any name passes.
    pub fn check_name(&self, wanted: &str) -> Result<(), PixelChoiceError> {
        self.resolve(Some(wanted)).map(|_| ())
    }

    fn names(&self) -> String {
        self.list
            .iter()
            .map(|p| p.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// What the rest of the configuration says about Meta, for [`load`].
pub struct Inputs<'a> {
    /// `[meta] pixel_id` from the file.
    pub file_pixel_id: Option<String>,
    /// `[meta] test_event_code` from the file.
    pub file_test_event_code: Option<String>,
    /// `[pixels.<name>]`.
    pub file_pixels: BTreeMap<String, FilePixel>,
    /// `default_pixel` from the file.
    pub file_default: Option<String>,
    /// The global API version.
    pub api_version: &'a str,
}

/// Reads the pixels: `META_PIXEL_ID`/`META_ACCESS_TOKEN` as `default`, then `[pixels.*]`.
pub fn load(env: &Env, inputs: Inputs<'_>, problems: &mut Vec<String>) -> Pixels {
    let mut list = Vec::new();
    let token = env.get("META_ACCESS_TOKEN");
    let pixel_id = env.get("META_PIXEL_ID").or(inputs.file_pixel_id);
    match (token, pixel_id) {
        (Some(access_token), Some(pixel_id)) => {
            if !is_numeric_id(&pixel_id) {
                problems.push("META_PIXEL_ID must be the numeric pixel (dataset) id".to_owned());
            }
            list.push(MetaConfig {
                name: DEFAULT_NAME.to_owned(),
                pixel_id,
                access_token,
                app_secret: env.get("META_APP_SECRET"),
                test_event_code: env
                    .get("META_TEST_EVENT_CODE")
                    .or(inputs.file_test_event_code),
                api_version: inputs.api_version.to_owned(),
            });
        }
        (Some(_), None) => problems.push(
            "META_ACCESS_TOKEN is set but META_PIXEL_ID is not: set both, or neither for dry-run"
                .to_owned(),
        ),
        (None, Some(_)) => problems.push(
            "META_PIXEL_ID is set but META_ACCESS_TOKEN is not: set both, or neither for dry-run"
                .to_owned(),
        ),
        (None, None) => {}
    }

    for (name, file) in inputs.file_pixels {
        let at = format!("pixels.{name}");
        if !is_name(&name) {
            problems.push(format!(
                "{at}: a pixel name is lowercase letters, digits, - and _"
            ));
            continue;
        }
        if name == DEFAULT_NAME && !list.is_empty() {
            problems.push(format!(
                "{at}: \"default\" is the pixel of META_PIXEL_ID; give this one another name"
            ));
            continue;
        }
        let Some(pixel_id) = file.pixel_id.filter(|id| !id.trim().is_empty()) else {
            problems.push(format!("{at}.pixel_id is missing"));
            continue;
        };
        if !is_numeric_id(&pixel_id) {
            problems.push(format!(
                "{at}.pixel_id must be the numeric pixel (dataset) id"
            ));
        }
        let suffix = name.to_uppercase().replace('-', "_");
        let token_var = file
            .access_token_env
            .unwrap_or_else(|| format!("META_ACCESS_TOKEN_{suffix}"));
        let Some(access_token) = env.get(&token_var) else {
            problems.push(format!("{at}: its token variable {token_var} is not set"));
            continue;
        };
        let app_secret = match file.app_secret_env {
            Some(var) => match env.get(&var) {
                Some(secret) => Some(secret),
                None => {
                    problems.push(format!("{at}: its app secret variable {var} is not set"));
                    None
                }
            },
            None => env.get(&format!("META_APP_SECRET_{suffix}")),
        };
        let api_version = file
            .api_version
            .unwrap_or_else(|| inputs.api_version.to_owned());
        if !crate::config::is_api_version(&api_version) {
            problems.push(format!(
                "{at}.api_version must look like v25.0, got {api_version:?}"
            ));
        }
        if list.iter().any(|p: &MetaConfig| p.pixel_id == pixel_id) {
            problems.push(format!("{at}: pixel {pixel_id} is configured twice"));
        }
        list.push(MetaConfig {
            name,
            pixel_id,
            access_token,
            app_secret,
            test_event_code: file.test_event_code.filter(|c| !c.trim().is_empty()),
            api_version,
        });
    }

    let wanted_default = env.get("META_DEFAULT_PIXEL").or(inputs.file_default);
    let default = match wanted_default {
        Some(wanted) => {
            let index = list
                .iter()
                .position(|p| p.name == wanted || p.pixel_id == wanted);
            if index.is_none() {
                problems.push(format!(
                    "default_pixel {wanted:?} is not a configured pixel"
                ));
            }
            index
        }
        None if list.len() == 1 => Some(0),
        None => list.iter().position(|p| p.name == DEFAULT_NAME),
    };
    Pixels { list, default }
}

fn is_numeric_id(id: &str) -> bool {
    !id.is_empty() && id.chars().all(|c| c.is_ascii_digit())
}

fn is_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pixels(env: &[(&str, &str)], toml: &str) -> (Pixels, Vec<String>) {
        #[derive(Deserialize)]
        struct File {
            #[serde(default)]
            pixels: BTreeMap<String, FilePixel>,
            default_pixel: Option<String>,
        }
        let file: File = toml::from_str(toml).expect("toml");
        let mut problems = Vec::new();
        let pixels = load(
            &Env::from_pairs(env.iter().copied()),
            Inputs {
                file_pixel_id: None,
                file_test_event_code: None,
                file_pixels: file.pixels,
                file_default: file.default_pixel,
                api_version: "v25.0",
            },
            &mut problems,
        );
        (pixels, problems)
    }

    const TWO: &str = r#"
        [pixels.shop]
        pixel_id = "111"
        api_version = "v24.0"
        test_event_code = "TEST1"
        [pixels.clinic]
        pixel_id = "222"
        access_token_env = "CLINIC_TOKEN"
    "#;

    #[test]
    fn single_pixel_setup_is_the_default() {
        let (pixels, problems) =
            pixels(&[("META_PIXEL_ID", "123"), ("META_ACCESS_TOKEN", "t")], "");
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(pixels.resolve(None), Ok("123"));
        assert_eq!(pixels.resolve(Some("default")), Ok("123"));
        assert_eq!(pixels.resolve(Some("123")), Ok("123"));
    }

    #[test]
    fn several_pixels_each_with_their_own_credentials() {
        let (pixels, problems) = pixels(
            &[
                ("META_ACCESS_TOKEN_SHOP", "shop-token"),
                ("META_APP_SECRET_SHOP", "shop-secret"),
                ("CLINIC_TOKEN", "clinic-token"),
            ],
            TWO,
        );
        assert!(problems.is_empty(), "{problems:?}");
        let shop = pixels.find("shop").expect("shop");
        assert_eq!(shop.access_token, "shop-token");
        assert_eq!(shop.app_secret.as_deref(), Some("shop-secret"));
        assert_eq!(shop.api_version, "v24.0");
        assert_eq!(shop.test_event_code.as_deref(), Some("TEST1"));
        let clinic = pixels.find("222").expect("clinic by id");
        assert_eq!(clinic.access_token, "clinic-token");
        assert_eq!(clinic.api_version, "v25.0");
        assert_eq!(clinic.app_secret, None);
        // Two pixels and no default: a request must choose.
        assert!(matches!(
            pixels.resolve(None),
            Err(PixelChoiceError::NoDefault { .. })
        ));
        assert_eq!(pixels.resolve(Some("clinic")), Ok("222"));
        let unknown = pixels.resolve(Some("shoes")).expect_err("unknown");
        assert_eq!(
            unknown.to_string(),
            "unknown pixel \"shoes\"; configured: clinic, shop"
        );
    }

    #[test]
    fn the_default_can_be_named_and_the_single_setup_stays_default_beside_others() {
        let env = [
            ("META_ACCESS_TOKEN_SHOP", "a"),
            ("CLINIC_TOKEN", "b"),
            ("META_PIXEL_ID", "999"),
            ("META_ACCESS_TOKEN", "c"),
        ];
        let (both, problems) = pixels(&env, TWO);
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(both.resolve(None), Ok("999"));
        let (named, problems) = pixels(&env, &format!("default_pixel = \"clinic\"\n{TWO}"));
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(named.resolve(None), Ok("222"));
    }

    #[test]
    fn configuration_mistakes_are_named() {
        let (_, problems) = pixels(
            &[],
            "[pixels.Shop]\npixel_id = \"1\"\n[pixels.web]\npixel_id = \"abc\"\n[pixels.app]\n",
        );
        let all = problems.join("\n");
        assert!(
            all.contains("pixels.Shop: a pixel name is lowercase"),
            "{all}"
        );
        assert!(
            all.contains("pixels.web.pixel_id must be the numeric"),
            "{all}"
        );
        assert!(
            all.contains("pixels.web: its token variable META_ACCESS_TOKEN_WEB is not set"),
            "{all}"
        );
        assert!(all.contains("pixels.app.pixel_id is missing"), "{all}");
        let (_, problems) = pixels(
            &[("T", "x")],
            "default_pixel = \"nope\"\n[pixels.a]\npixel_id = \"1\"\naccess_token_env = \"T\"\n",
        );
        assert!(
            problems
                .iter()
                .any(|p| p.contains("default_pixel \"nope\"")),
            "{problems:?}"
        );
    }

    #[test]
    fn dry_run_accepts_any_choice_and_sends_nowhere() {
        let (pixels, problems) = pixels(&[], "");
        assert!(problems.is_empty());
        assert!(pixels.is_empty());
        assert_eq!(pixels.resolve(Some("anything")), Ok(""));
        assert_eq!(pixels.resolve(None), Ok(""));
    }
}
