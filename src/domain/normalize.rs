//! Per-field normalization and SHA-256 hashing of Meta `user_data` customer information
//! (`meta-capi.md` §2 and §11). Pure: no I/O, no clock, no logging, no panics.
//!
//! Where Meta's SDKs disagree this follows the recommendation of §11 (stricter choice); the
//! deliberate departures from SDK test vectors are listed in the tests.

mod date;
mod phone;
mod place;

use sha2::{Digest, Sha256};
use unicode_normalization::char::is_combining_mark;
use unicode_normalization::UnicodeNormalization;

/// A `user_data` key that Meta wants normalized and SHA-256 hashed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum HashedKey {
    Em,
    Ph,
    Fn,
    Ln,
    Ct,
    St,
    Zp,
    Country,
    Db,
    Ge,
    ExternalId,
}

impl HashedKey {
    /// Every hashed key, in Meta's documentation order.
    pub const ALL: [HashedKey; 11] = [
        HashedKey::Em,
        HashedKey::Ph,
        HashedKey::Fn,
        HashedKey::Ln,
        HashedKey::Ct,
        HashedKey::St,
        HashedKey::Zp,
        HashedKey::Country,
        HashedKey::Db,
        HashedKey::Ge,
        HashedKey::ExternalId,
    ];

    /// Parses Meta's key name (`em`, `ph`, …, `external_id`).
    pub fn parse(key: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == key)
    }

    /// Meta's key name.
    pub fn as_str(self) -> &'static str {
        match self {
            HashedKey::Em => "em",
            HashedKey::Ph => "ph",
            HashedKey::Fn => "fn",
            HashedKey::Ln => "ln",
            HashedKey::Ct => "ct",
            HashedKey::St => "st",
            HashedKey::Zp => "zp",
            HashedKey::Country => "country",
            HashedKey::Db => "db",
            HashedKey::Ge => "ge",
            HashedKey::ExternalId => "external_id",
        }
    }
}

/// Why a value could not be normalized. The reason never contains the value itself.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason}")]
pub struct Refusal {
    /// A short lowercase explanation, e.g. "not an email address".
    pub reason: &'static str,
}

/// What the normalizer knows about the event besides the value itself.
#[derive(Debug, Clone, Copy, Default)]
pub struct Context<'a> {
    /// ISO 3166-1 alpha-2 code, lowercase, of the person's country when known (the event's
    /// own `country`, else `DEFAULT_COUNTRY`). Used to complete national phone numbers.
    pub country: Option<&'a str>,
}

/// A value ready to be sent to Meta.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prepared {
    /// The normalized plain text that was hashed; `None` when the input was already hashed.
    pub normalized: Option<String>,
    /// The value to put in `user_data`: a lowercase SHA-256 hex digest, or a pre-hashed value
    /// passed through.
    pub sent: String,
}

/// Normalizes and hashes one raw value for `key`.
///
/// Returns `Ok(None)` for empty or blank input (dropped, never hashed).
///
/// Input that is already hashed is passed through, for every key: a 64-hex SHA-256 digest
/// (lowercased), or a Meta parameter-builder value `<64 hex>.<appendix>` (exactly as is, since
/// Meta says those are case-sensitive). A 32-hex value (MD5) is *not* taken as hashed: Meta
/// wants SHA-256, and a dashless UUID `external_id` looks just like one, so it is normalized
/// and hashed like any other value.
///
/// # Errors
/// A [`Refusal`] when the value cannot be normalized under Meta's rules.
pub fn prepare(key: HashedKey, raw: &str, ctx: &Context) -> Result<Option<Prepared>, Refusal> {
    let value = raw.trim();
    if value.is_empty() {
        return Ok(None);
    }
    if let Some(sent) = pre_hashed(value) {
        if sent
            .get(..64)
            .is_some_and(|digest| digest.eq_ignore_ascii_case(EMPTY_SHA256))
        {
            return Err(refuse("value is the hash of an empty string"));
        }
        return Ok(Some(Prepared {
            normalized: None,
            sent,
        }));
    }
    let normalized = match key {
        HashedKey::Em => email(value)?,
        HashedKey::Ph => phone::phone(value, ctx.country)?,
        HashedKey::Fn | HashedKey::Ln => name(value)?,
        HashedKey::Ct => city(value)?,
        HashedKey::St => place::state(value)?,
        HashedKey::Zp => place::postal_code(value)?,
        HashedKey::Country => place::country_code(value)
            .ok_or(refuse("not an ISO 3166-1 country"))?
            .to_owned(),
        HashedKey::Db => date::date_of_birth(value)?,
        HashedKey::Ge => gender(value)?.to_owned(),
        // §11.11: trim and lowercase only (internal spaces and punctuation are kept, unlike
        // the parameter builder); the browser Pixel must apply the same transformation.
        HashedKey::ExternalId => value.to_lowercase(),
    };
    // Every rule above refuses empty results; this keeps the hash of "" out whatever happens.
    if normalized.is_empty() {
        return Err(refuse("nothing left after normalization"));
    }
    Ok(Some(Prepared {
        sent: sha256_hex(&normalized),
        normalized: Some(normalized),
    }))
}

/// Maps a country code, name or common alias to a lowercase ISO 3166-1 alpha-2 code.
///
/// Accepts alpha-2 and alpha-3 codes in any case, English names (`United States`), common
/// aliases (`UK`, `U.S.A.`, `America`, `England`, `Great Britain`) and Portuguese or Spanish
/// names (`Brasil`, `Estados Unidos`, `Deutschland`, …); case, accents, spaces and punctuation
/// are ignored. `None` for anything that is not an assigned ISO 3166-1 country (`unknown`,
/// `XK`).
pub fn country_code(raw: &str) -> Option<&'static str> {
    place::country_code(raw)
}

/// Validates an ISO 4217 currency code (any case, surrounding spaces allowed) and returns it
/// uppercase.
pub fn currency_code(raw: &str) -> Option<String> {
    let code = raw.trim();
    if code.len() != 3 || !code.bytes().all(|b| b.is_ascii_alphabetic()) {
        return None;
    }
    iso_currency::Currency::from_code(&code.to_ascii_uppercase()).map(|c| c.code().to_owned())
}

/// Lowercase hex SHA-256 of the UTF-8 bytes of `text`.
pub fn sha256_hex(text: &str) -> String {
    hex::encode(Sha256::digest(text.as_bytes()))
}

/// SHA-256 of the empty string: never sent, it would only mean "nothing".
const EMPTY_SHA256: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

const fn refuse(reason: &'static str) -> Refusal {
    Refusal { reason }
}

/// The value to send when `value` (trimmed) is already hashed: a 64-hex digest lowercased, or a
/// parameter-builder `<64 hex>.<2–8 chars of [A-Za-z0-9_-]>` value unchanged.
fn pre_hashed(value: &str) -> Option<String> {
    if is_hex64(value) {
        return Some(value.to_ascii_lowercase());
    }
    let (digest, appendix) = value.split_once('.')?;
    let appendix_ok = (2..=8).contains(&appendix.len())
        && appendix
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    (is_hex64(digest) && appendix_ok).then(|| value.to_owned())
}

fn is_hex64(value: &str) -> bool {
    value.len() == 64 && value.bytes().all(|b| b.is_ascii_hexdigit())
}

/// `em`: lowercase; one `@`; a non-empty local part without whitespace or leading, trailing
/// or doubled dots; a domain of at least two non-empty `[a-z0-9-]` labels. No Gmail dot
/// removal (that is Google's rule, not Meta's).
fn email(value: &str) -> Result<String, Refusal> {
    const NOT_AN_EMAIL: Refusal = refuse("not an email address");
    let lower = value.to_lowercase();
    // RFC 5321 caps a forward path at 256 octets including the angle brackets.
    if lower.len() > 254 {
        return Err(refuse("email address is too long"));
    }
    if lower.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(NOT_AN_EMAIL);
    }
    let (local, domain) = lower.split_once('@').ok_or(NOT_AN_EMAIL)?;
    let local_ok = !local.is_empty()
        && !local.contains('@')
        && !local.starts_with('.')
        && !local.ends_with('.')
        && !local.contains("..");
    let labels: Vec<&str> = domain.split('.').collect();
    let domain_ok = labels.len() >= 2
        && labels.iter().all(|label| {
            !label.is_empty()
                && label
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        });
    if local_ok && domain_ok {
        Ok(lower)
    } else {
        Err(NOT_AN_EMAIL)
    }
}

/// `fn` / `ln`: NFC, lowercase, letters and digits of any script only.
fn name(value: &str) -> Result<String, Refusal> {
    let cleaned = letters_and_digits(value, true);
    if cleaned.is_empty() {
        return Err(refuse("name has no letters or digits"));
    }
    Ok(cleaned)
}

/// `ct`: NFC, lowercase, letters of any script only (no spaces, punctuation or digits). Unlike
/// Meta's parameter builder, non-ASCII letters are kept (`São Paulo` → `sãopaulo`): the docs
/// allow UTF-8 and Python's SDK keeps them.
fn city(value: &str) -> Result<String, Refusal> {
    let cleaned = letters_and_digits(value, false);
    if cleaned.is_empty() {
        return Err(refuse("city has no letters"));
    }
    Ok(cleaned)
}

/// `ge`: `f` or `m` from the usual English, Portuguese and Spanish words.
fn gender(value: &str) -> Result<&'static str, Refusal> {
    match fold_to_ascii_letters(value).as_str() {
        "f" | "female" | "woman" | "girl" | "feminine" | "fem" | "feminino" | "feminina"
        | "mulher" | "menina" | "femenino" | "femenina" | "mujer" => Ok("f"),
        "m" | "male" | "man" | "boy" | "masculine" | "masc" | "masculino" | "homem" | "menino"
        | "hombre" | "varon" => Ok("m"),
        _ => Err(refuse("gender is neither female nor male")),
    }
}

/// NFC, lowercase, then only letters of any script (and digits when `keep_digits`), with the
/// combining marks that belong to a kept letter; NFC again so the result is stable when fed
/// back in.
fn letters_and_digits(value: &str, keep_digits: bool) -> String {
    let lowered: String = value.nfc().collect::<String>().to_lowercase();
    let mut kept = String::with_capacity(lowered.len());
    let mut previous_kept = false;
    for c in lowered.chars() {
        let keep = if is_combining_mark(c) {
            previous_kept
        } else if keep_digits {
            c.is_alphanumeric()
        } else {
            c.is_alphabetic()
        };
        if keep {
            kept.push(c);
        }
        previous_kept = keep;
    }
    kept.nfc().collect()
}

/// A lookup key: lowercase letters with accents removed (`Québec` → `quebec`, `U.K.` → `uk`).
/// Letters without an ASCII base (`정`) are kept as they are.
fn fold_to_ascii_letters(value: &str) -> String {
    value
        .nfd()
        .filter(|c| !is_combining_mark(*c))
        .flat_map(char::to_lowercase)
        .filter(|c| c.is_alphabetic())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The normalized text for `raw`, `Ok(None)` when dropped, `Err(reason)` when refused.
    fn normalized(
        key: HashedKey,
        raw: &str,
        country: Option<&str>,
    ) -> Result<Option<String>, &'static str> {
        prepare(key, raw, &Context { country })
            .map(|prepared| prepared.and_then(|p| p.normalized))
            .map_err(|refusal| refusal.reason)
    }

    /// `expected: None` means the value must be refused.
    fn check(key: HashedKey, country: Option<&str>, cases: &[(&str, Option<&str>)]) {
        for (raw, expected) in cases {
            let got = normalized(key, raw, country);
            match expected {
                Some(want) => assert_eq!(
                    got,
                    Ok(Some((*want).to_owned())),
                    "{key:?} {raw:?} with country {country:?}"
                ),
                None => assert!(
                    got.is_err(),
                    "{key:?} {raw:?} with country {country:?} should be refused, got {got:?}"
                ),
            }
        }
    }

    fn sent(key: HashedKey, raw: &str, country: Option<&str>) -> Option<String> {
        prepare(key, raw, &Context { country })
            .ok()
            .flatten()
            .map(|p| p.sent)
    }

    // ---- Meta's documented examples (meta-capi.md §2.2) -------------------------------------

    #[test]
    fn metas_documented_examples_hash_to_the_documented_digests() {
        let cases: &[(HashedKey, &str, Option<&str>, &str)] = &[
            (
                HashedKey::Em,
                "John_Smith@gmail.com",
                None,
                "62a14e44f765419d10fea99367361a727c12365e2520f32218d505ed9aa0f62f",
            ),
            (
                HashedKey::Ph,
                "(650)555-1212",
                Some("us"),
                "e323ec626319ca94ee8bff2e4c87cf613be6ea19919ed1364124e16807ab3176",
            ),
            (
                HashedKey::Fn,
                "Mary",
                None,
                "6915771be1c5aa0c886870b6951b03d7eafc121fea0e80a5ea83beb7c449f4ec",
            ),
            (
                HashedKey::Fn,
                "정",
                None,
                "8fa8cd9c440be61d0151429310034083132b35975c4bea67fdd74158eb51db14",
            ),
            (
                HashedKey::Fn,
                "Valéry",
                None,
                "08e1996b5dd49e62a4b4c010d44e4345592a863bb9f8e3976219bac29417149c",
            ),
            (
                HashedKey::Db,
                "2/16/1997",
                None,
                "01acdbf6ec7b4f478a225f1a246e5d6767eeab1a7ffa17f025265b5b94f40f0c",
            ),
            (
                HashedKey::Ge,
                "f",
                None,
                "252f10c83610ebca1a059c0bae8255eba2f95be4d1d7bcfa89d7248a82d9f111",
            ),
            (
                HashedKey::Ge,
                "m",
                None,
                "62c66a7a5dd70c3146618063c344e531e6d4b59e379808443ce962b3abd63c5a",
            ),
            (
                HashedKey::St,
                "ca",
                None,
                "6959097001d10501ac7d54c0bdb8db61420f658f2922cc26e46d536119a31126",
            ),
            (
                HashedKey::Zp,
                "94035",
                None,
                "1794327a4d443904421f5ca1f3d72d0a62ba2f0770d80755ec2220fc0efb052e",
            ),
            (
                HashedKey::Zp,
                "M1 1AE",
                None,
                "1dc694c2070e697769fb959b50671d76cafd430d8ca191fbdd0affcaea344ac5",
            ),
            (
                HashedKey::Country,
                "United States",
                None,
                "79adb2a2fce5c6ba215fe5f27f532d4e7edbac4b6a5e09e1ef3a08084a904621",
            ),
        ];
        for (key, raw, country, digest) in cases {
            assert_eq!(
                sent(*key, raw, *country).as_deref(),
                Some(*digest),
                "{key:?} {raw:?}"
            );
        }
    }

    #[test]
    fn the_documented_city_example_paris_hashes_to_the_documented_digest() {
        // The doc abbreviates this one: `1670f2e4…3c57`.
        let digest = sent(HashedKey::Ct, "Paris", None).unwrap_or_default();
        assert!(
            digest.starts_with("1670f2e4") && digest.ends_with("3c57"),
            "{digest}"
        );
    }

    #[test]
    fn sha256_hex_is_lowercase_hex_of_the_utf8_bytes() {
        assert_eq!(sha256_hex(""), EMPTY_SHA256);
        assert_eq!(
            sha256_hex("valéry"),
            "08e1996b5dd49e62a4b4c010d44e4345592a863bb9f8e3976219bac29417149c"
        );
    }

    // ---- Blank and pre-hashed input ---------------------------------------------------------

    #[test]
    fn blank_values_are_dropped_for_every_key() {
        for key in HashedKey::ALL {
            for raw in ["", " ", "\t\n", "\u{3000}"] {
                assert_eq!(prepare(key, raw, &Context::default()), Ok(None), "{key:?}");
            }
        }
    }

    #[test]
    fn a_sha256_digest_passes_through_lowercased_for_every_key() {
        let upper = "A665A45920422F9D417E4867EFDC4FB8A04A1F3FFF1FA07E998E86F7F7A27AE3";
        for key in HashedKey::ALL {
            let got = prepare(key, &format!("  {upper}\n"), &Context::default());
            assert_eq!(
                got,
                Ok(Some(Prepared {
                    normalized: None,
                    sent: upper.to_ascii_lowercase(),
                })),
                "{key:?}"
            );
        }
    }

    #[test]
    fn a_parameter_builder_value_passes_through_exactly_as_is() {
        let digest = "62a14e44f765419d10fea99367361a727c12365e2520f32218d505ed9aa0f62f";
        for appendix in ["ABcDEFGh", "AQ", "Bg", "a_b-C"] {
            let value = format!("{digest}.{appendix}");
            for key in HashedKey::ALL {
                assert_eq!(
                    prepare(key, &format!(" {value} "), &Context::default()),
                    Ok(Some(Prepared {
                        normalized: None,
                        sent: value.clone(),
                    }))
                );
            }
        }
        // Uppercase hex is kept too: Meta says these values are case-sensitive.
        let upper = format!("{}.AQQCAQMB", digest.to_ascii_uppercase());
        assert_eq!(sent(HashedKey::Em, &upper, None), Some(upper.clone()));
    }

    #[test]
    fn near_misses_of_the_hashed_forms_are_normalized_not_passed_through() {
        let digest = "62a14e44f765419d10fea99367361a727c12365e2520f32218d505ed9aa0f62f";
        // Appendix too short, too long, or with a forbidden character: hashed as an id.
        for raw in [
            format!("{digest}.A"),
            format!("{digest}.ABCDEFGHI"),
            format!("{digest}.AB!"),
            format!("{digest}x"),
            digest.get(..63).unwrap_or_default().to_owned(),
        ] {
            let got = prepare(HashedKey::ExternalId, &raw, &Context::default());
            assert_eq!(
                got.ok().flatten().and_then(|p| p.normalized),
                Some(raw.to_lowercase())
            );
        }
    }

    #[test]
    fn a_32_hex_md5_or_dashless_uuid_is_hashed_not_passed_through() {
        // SDK vector #60 passes MD5 through; Meta's docs ask for SHA-256 and a dashless UUID
        // external_id looks exactly like an MD5, so we hash it.
        let uuid = "2A6A84E9E44441AFBD75CC19CE28BE37";
        assert_eq!(
            prepare(HashedKey::ExternalId, uuid, &Context::default()),
            Ok(Some(Prepared {
                normalized: Some(uuid.to_ascii_lowercase()),
                sent: sha256_hex(&uuid.to_ascii_lowercase()),
            }))
        );
        // As an email it is simply not an email.
        assert!(prepare(HashedKey::Em, uuid, &Context::default()).is_err());
    }

    #[test]
    fn the_hash_of_the_empty_string_is_refused_even_when_pre_hashed() {
        for raw in [
            EMPTY_SHA256.to_owned(),
            EMPTY_SHA256.to_ascii_uppercase(),
            format!("{EMPTY_SHA256}.AQQCAQMB"),
        ] {
            for key in HashedKey::ALL {
                assert!(prepare(key, &raw, &Context::default()).is_err(), "{key:?}");
            }
        }
    }

    #[test]
    fn refusal_reasons_never_echo_the_value() {
        let raw = "Zyxwvut Secret <zyx@@example>";
        for key in HashedKey::ALL {
            if let Err(refusal) = prepare(key, raw, &Context::default()) {
                assert!(
                    !refusal.reason.contains("zyx"),
                    "{key:?}: {}",
                    refusal.reason
                );
                assert!(!refusal.to_string().contains("Zyx"));
            }
        }
    }

    // ---- em -------------------------------------------------------------------------------

    #[test]
    fn emails_are_trimmed_lowercased_and_validated() {
        check(
            HashedKey::Em,
            None,
            &[
                ("John_Smith@gmail.com", Some("john_smith@gmail.com")),
                ("  John_Smith@Gmail.com ", Some("john_smith@gmail.com")),
                // No Gmail dot or plus removal: that is Google's rule, not Meta's.
                ("j.o.h.n+ads@gmail.com", Some("j.o.h.n+ads@gmail.com")),
                ("a@b.co", Some("a@b.co")),
                (
                    "x@sub-domain.example123.com",
                    Some("x@sub-domain.example123.com"),
                ),
                ("tést@gmail.com", Some("tést@gmail.com")),
                ("ÉMILE@EXAMPLE.FR", Some("émile@example.fr")),
                ("john smith@gmail.com", None),
                ("john@gmail .com", None),
                ("john@@gmail.com", None),
                ("a@b@c.com", None),
                ("john.@gmail.com", None),
                ("john@gmail..com", None),
                ("john@.gmail.com", None),
                ("john@gmail.com.", None),
                ("john@gmail_x.com", None),
                ("john@gmaíl.com", None),
                ("john@localhost", None),
                ("john\u{0}@gmail.com", None),
                ("john", None),
            ],
        );
    }

    #[test]
    fn emails_longer_than_254_characters_are_refused() {
        let long = format!("{}@example.com", "a".repeat(250));
        assert!(normalized(HashedKey::Em, &long, None).is_err());
    }

    // ---- ph -------------------------------------------------------------------------------

    #[test]
    fn international_phone_numbers_become_e164_digits() {
        check(
            HashedKey::Ph,
            None,
            &[
                ("+1 (650) 555-1212", Some("16505551212")),
                ("+1 650.555.1212", Some("16505551212")),
                ("0044 20 7946 0958", Some("442079460958")),
                ("+44 20 7946 0958", Some("442079460958")),
                // Trunk `(0)` after the country code goes.
                ("+44 (0)20 7946 0958", Some("442079460958")),
                ("+44 ( 0 ) 20 7946 0958", Some("442079460958")),
                ("+55 (11) 98765-4321", Some("5511987654321")),
                ("+39 06 1234 5678", Some("390612345678")),
                ("tel:+1-650-555-1212", Some("16505551212")),
                ("＋１ ６５０ ５５５ １２１２", Some("16505551212")),
                // Already E.164 digits and valid with a `+`: no country needed.
                ("16505551212", Some("16505551212")),
                ("442079460958", Some("442079460958")),
            ],
        );
        // An international number ignores the event's country.
        check(
            HashedKey::Ph,
            Some("br"),
            &[("+44 20 7946 0958", Some("442079460958"))],
        );
    }

    #[test]
    fn national_phone_numbers_take_the_events_country_code() {
        check(
            HashedKey::Ph,
            Some("us"),
            &[
                ("(650)555-1212", Some("16505551212")),
                ("650-555-1212", Some("16505551212")),
                ("1 650 555 1212", Some("16505551212")),
                // US international dialling prefix.
                ("011 44 20 7946 0958", Some("442079460958")),
                ("011 55 11 98765 4321", Some("5511987654321")),
                ("011 1 650 555 1212", Some("16505551212")),
            ],
        );
        check(
            HashedKey::Ph,
            Some("au"),
            &[
                ("0011 44 20 7946 0958", Some("442079460958")),
                ("(02) 9876 5432", Some("61298765432")),
            ],
        );
        check(
            HashedKey::Ph,
            Some("gb"),
            &[
                ("020 7946 0958", Some("442079460958")),
                ("07911 123456", Some("447911123456")),
            ],
        );
        check(
            HashedKey::Ph,
            Some("br"),
            &[
                ("(11) 98765-4321", Some("5511987654321")),
                ("11 3456-7890", Some("551134567890")),
                // Country code included without the `+`.
                ("5511987654321", Some("5511987654321")),
                ("55 11 98765 4321", Some("5511987654321")),
            ],
        );
        // The country may come in any form country_code accepts.
        check(
            HashedKey::Ph,
            Some("United States"),
            &[("(650)555-1212", Some("16505551212"))],
        );
    }

    #[test]
    fn a_national_phone_number_without_any_country_is_refused_with_a_hint() {
        for country in [None, Some("zz"), Some("")] {
            assert_eq!(
                normalized(HashedKey::Ph, "(650)555-1212", country),
                Err("phone number has no country code; set the event's country or DEFAULT_COUNTRY")
            );
        }
    }

    #[test]
    fn phone_extensions_are_dropped() {
        // SDK vector #10 keeps the extension digits (`15551234567123`); we hash only the main
        // number (and 555-123-4567 itself is not a valid US number, see the vectors test).
        for raw in [
            "+1 650-555-1212 ext. 123",
            "+1 650-555-1212 x123",
            "+1 650-555-1212 #123",
            "+1 650 555 1212 extension 9",
            "tel:+1-650-555-1212;ext=123",
            "+1 650-555-1212, 123",
            "+1 650 555 1212 ramal 45",
        ] {
            assert_eq!(
                normalized(HashedKey::Ph, raw, None),
                Ok(Some("16505551212".to_owned())),
                "{raw}"
            );
        }
    }

    #[test]
    fn phone_numbers_with_too_few_or_too_many_digits_or_invalid_are_refused() {
        check(
            HashedKey::Ph,
            Some("us"),
            &[
                ("12345", None),
                ("+123456", None),
                ("+1 650 555 1212 1234 5678", None),
                ("1234567890123456", None),
                ("555-1212", None),
                ("+0 650 555 1212", None),
                ("phone", None),
                ("---", None),
                ("+999 1234 5678", None),
            ],
        );
    }

    // ---- fn / ln ----------------------------------------------------------------------------

    #[test]
    fn names_keep_letters_and_digits_of_any_script() {
        for key in [HashedKey::Fn, HashedKey::Ln] {
            check(
                key,
                None,
                &[
                    ("Mary", Some("mary")),
                    ("  Mary-Jane  O'Connor  ", Some("maryjaneoconnor")),
                    ("José María", Some("josémaría")),
                    ("Müller", Some("müller")),
                    ("정", Some("정")),
                    ("Valéry", Some("valéry")),
                    // Decomposed input is composed (NFC) before hashing.
                    ("Vale\u{301}ry", Some("valéry")),
                    ("David#123", Some("david123")),
                    ("ΟΔΥΣΣΕΑΣ", Some("οδυσσεας")),
                    ("Иванова", Some("иванова")),
                    ("محمد", Some("محمد")),
                    ("देवनागरी", Some("देवनागरी")),
                    ("St. John-Smythe, Jr.", Some("stjohnsmythejr")),
                    ("---", None),
                    ("'.'", None),
                ],
            );
        }
    }

    // ---- ct ---------------------------------------------------------------------------------

    #[test]
    fn cities_keep_only_letters_of_any_script() {
        check(
            HashedKey::Ct,
            None,
            &[
                ("New York", Some("newyork")),
                ("St. Louis", Some("stlouis")),
                ("O'Fallon", Some("ofallon")),
                ("São Paulo", Some("sãopaulo")),
                ("Москва", Some("москва")),
                ("東京", Some("東京")),
                ("Winston-Salem 27101", Some("winstonsalem")),
                ("12345", None),
                ("!?", None),
            ],
        );
    }

    // ---- st ---------------------------------------------------------------------------------

    #[test]
    fn us_states_and_canadian_provinces_map_to_their_codes() {
        check(
            HashedKey::St,
            None,
            &[
                ("California", Some("ca")),
                ("CA", Some("ca")),
                ("North Carolina", Some("nc")),
                ("    C/a/lifo,rnia.  ", Some("ca")),
                ("N.Y.", Some("ny")),
                ("new york", Some("ny")),
                ("West Virginia", Some("wv")),
                ("District of Columbia", Some("dc")),
                ("Puerto Rico", Some("pr")),
                ("Québec", Some("qc")),
                ("Quebec", Some("qc")),
                ("British Columbia", Some("bc")),
                ("Newfoundland and Labrador", Some("nl")),
                ("Prince Edward Island", Some("pe")),
                ("Yukon", Some("yt")),
            ],
        );
    }

    #[test]
    fn other_states_keep_their_letters_only() {
        check(
            HashedKey::St,
            None,
            &[
                ("  TE", Some("te")),
                ("SP", Some("sp")),
                ("São Paulo", Some("sãopaulo")),
                ("Rio de Janeiro", Some("riodejaneiro")),
                ("Baden-Württemberg", Some("badenwürttemberg")),
                ("東京都", Some("東京都")),
                ("Region 12", Some("region")),
                ("123", None),
                (".", None),
            ],
        );
    }

    // ---- zp ---------------------------------------------------------------------------------

    #[test]
    fn postal_codes_are_compacted_and_us_zips_keep_five_digits() {
        check(
            HashedKey::Zp,
            None,
            &[
                ("94035", Some("94035")),
                ("94105-1234", Some("94105")),
                ("941051234", Some("94105")),
                (" 94105 - 1234 ", Some("94105")),
                ("SW1A 1AA", Some("sw1a1aa")),
                ("M1 1AE", Some("m11ae")),
                ("1987", Some("1987")),
                ("75018", Some("75018")),
                // Brazilian CEP and other non-US forms keep everything but the dash.
                ("01310-100", Some("01310100")),
                ("K1A 0B1", Some("k1a0b1")),
                ("1010-123", Some("1010123")),
                ("AB", Some("ab")),
                ("-12345", None),
                ("1", None),
                ("-", None),
                ("٣٤٥٦٧", None),
            ],
        );
    }

    // ---- country ----------------------------------------------------------------------------

    #[test]
    fn countries_map_codes_names_and_aliases_to_iso_alpha2() {
        let cases: &[(&str, Option<&str>)] = &[
            ("us", Some("us")),
            ("US", Some("us")),
            ("Gb", Some("gb")),
            ("BRA", Some("br")),
            ("usa", Some("us")),
            ("U.S.A.", Some("us")),
            ("America", Some("us")),
            ("United States", Some("us")),
            ("United States of America", Some("us")),
            ("  United States  ", Some("us")),
            ("UK", Some("gb")),
            ("U.K.", Some("gb")),
            ("England", Some("gb")),
            ("Scotland", Some("gb")),
            ("Wales", Some("gb")),
            ("Northern Ireland", Some("gb")),
            ("Great Britain", Some("gb")),
            ("United Kingdom", Some("gb")),
            ("G@B", Some("gb")),
            ("Brazil", Some("br")),
            ("Brasil", Some("br")),
            ("Deutschland", Some("de")),
            ("Germany", Some("de")),
            ("Estados Unidos", Some("us")),
            ("EUA", Some("us")),
            ("Reino Unido", Some("gb")),
            ("Alemanha", Some("de")),
            ("México", Some("mx")),
            ("España", Some("es")),
            ("Türkiye", Some("tr")),
            ("Turkey", Some("tr")),
            ("Côte d'Ivoire", Some("ci")),
            ("Russia", Some("ru")),
            ("South Korea", Some("kr")),
            ("Samoa", Some("ws")),
            ("American Samoa", Some("as")),
            ("North Macedonia", Some("mk")),
            ("Åland Islands", Some("ax")),
            ("unknown", None),
            ("uk.gov", None),
            ("XK", None),
            ("Kosovo", None),
            ("zz", None),
            ("840", None),
            ("Atlantis", None),
            ("...", None),
        ];
        for (raw, expected) in cases {
            assert_eq!(country_code(raw), *expected, "{raw:?}");
        }
        check(HashedKey::Country, None, cases);
        assert_eq!(country_code(""), None);
        assert_eq!(country_code("  "), None);
    }

    // ---- db ---------------------------------------------------------------------------------

    #[test]
    fn dates_of_birth_become_yyyymmdd() {
        check(
            HashedKey::Db,
            None,
            &[
                ("1997-02-16", Some("19970216")),
                ("19970216", Some("19970216")),
                ("2/16/1997", Some("19970216")),
                ("02/16/1997", Some("19970216")),
                ("16-2-1997", Some("19970216")),
                ("16/02/1997", Some("19970216")),
                ("16.02.1997", Some("19970216")),
                ("1997/2/16", Some("19970216")),
                ("1997 02 16", Some("19970216")),
                ("1997-02-16T00:00:00Z", Some("19970216")),
                ("1997-02-16T23:59:59.999+03:00", Some("19970216")),
                ("1997-02-16 10:00", Some("19970216")),
                ("12月31日1990年", Some("19901231")),
                ("1990年12月31日", Some("19901231")),
                ("２/１６/１９９７", Some("19970216")),
                ("2000-02-29", Some("20000229")),
                ("1900-01-01", Some("19000101")),
                ("2100-12-31", Some("21001231")),
            ],
        );
    }

    #[test]
    fn impossible_or_ambiguous_dates_of_birth_are_refused() {
        check(
            HashedKey::Db,
            None,
            &[
                ("1997-02-30", None),
                ("1900-02-29", None),
                ("2/30/1997", None),
                ("13/13/1997", None),
                ("0/12/1997", None),
                ("12/0/1997", None),
                ("12/31/90", None),
                ("90-12-31", None),
                ("December 31, 1990", None),
                ("31 Dec 1990", None),
                ("01-01-1799", None),
                ("1899-12-31", None),
                ("2101-01-01", None),
                ("19973016", None),
                ("1997021", None),
                ("970216", None),
                ("1997", None),
                ("12-1997-31", None),
                ("1997-02-16-01", None),
                ("1997-002-16", None),
                ("1997-02-16Tnoon", None),
            ],
        );
    }

    // ---- ge ---------------------------------------------------------------------------------

    #[test]
    fn genders_map_to_f_or_m() {
        check(
            HashedKey::Ge,
            None,
            &[
                ("f", Some("f")),
                ("F", Some("f")),
                ("Female", Some("f")),
                ("        Woman         ", Some("f")),
                ("Feminino", Some("f")),
                ("Mulher", Some("f")),
                ("mujer", Some("f")),
                ("F.", Some("f")),
                ("m", Some("m")),
                ("MALE", Some("m")),
                ("man", Some("m")),
                ("Boy", Some("m")),
                ("Masculino", Some("m")),
                ("Homem", Some("m")),
                ("Hombre", Some("m")),
                ("Varón", Some("m")),
                ("x", None),
                ("non-binary", None),
                ("unknown", None),
                ("fm", None),
            ],
        );
    }

    // ---- external_id ------------------------------------------------------------------------

    #[test]
    fn external_ids_are_trimmed_and_lowercased_only() {
        check(
            HashedKey::ExternalId,
            None,
            &[
                ("USER-ID-456", Some("user-id-456")),
                ("    12345", Some("12345")),
                ("ABC-123", Some("abc-123")),
                ("a b\tc", Some("a b\tc")),
                ("Ünïcode_ID", Some("ünïcode_id")),
            ],
        );
        assert_eq!(
            sent(HashedKey::ExternalId, "ABC-123", None),
            Some(sha256_hex("abc-123"))
        );
    }

    // ---- currency ---------------------------------------------------------------------------

    #[test]
    fn currency_codes_are_validated_against_iso_4217_and_uppercased() {
        assert_eq!(currency_code("USD").as_deref(), Some("USD"));
        assert_eq!(currency_code(" usd ").as_deref(), Some("USD"));
        assert_eq!(currency_code("brl").as_deref(), Some("BRL"));
        assert_eq!(currency_code("Eur").as_deref(), Some("EUR"));
        for bad in [
            "", "US", "USDD", "XYZ", "U$D", "123", "usd.", "dólar", "ÜSD",
        ] {
            assert_eq!(currency_code(bad), None, "{bad:?}");
        }
    }

    // ---- Meta SDK test vectors (meta-capi.md §10.5) -----------------------------------------

    #[test]
    fn sdk_test_vectors_that_agree_with_our_rules_hold() {
        check(
            HashedKey::Em,
            None,
            &[
                (
                    "     John_Smith@gmail.com    ",
                    Some("john_smith@gmail.com"),
                ), // #1
                ("\tTEST@EXAMPLE.COM\n", Some("test@example.com")), // #2
                (
                    "user.name+tag@domain.co.uk",
                    Some("user.name+tag@domain.co.uk"),
                ), // #3
                ("test..test@example.com", None),                   // #4
                ("test @example.com", None),                        // #4
                ("test@example", None),                             // #4
                (".test@example.com", None),                        // #4
                ("a", None),                                        // #55
                ("abc", None),                                      // #55
                ("a@b", None),                                      // #55
                ("@b.c", None),                                     // #55
                (".c", None),                                       // #55
                ("@", None),                                        // #55
                ("f`oo@bar.com", Some("f`oo@bar.com")),             // #56
                ("fo'o@bar.com", Some("fo'o@bar.com")),             // #56
                ("1234", None),                                     // #59
                ("not-an-email", None),                             // #65
            ],
        );
        check(
            HashedKey::Ph,
            None,
            &[
                ("+1 (616) 954-78 88", Some("16169547888")),   // #6
                ("+001 (616) 954-78 88", Some("16169547888")), // #7
                ("+44 20 7946 0958", Some("442079460958")),    // #9
            ],
        );
        check(
            HashedKey::Db,
            None,
            &[
                ("2/16/1997", Some("19970216")),      // #14
                ("16–2–1997", Some("19970216")),      // #15, en dashes
                ("05-03-1995", Some("19950503")),     // #16, ambiguous → month first
                ("13-02-1990", Some("19900213")),     // #17
                ("12/31/90", None),                   // #18
                ("December 31, 1990", None),          // #18
                ("01-01-1799", None),                 // #18
                ("12月31日1990年", Some("19901231")), // #19
            ],
        );
        check(
            HashedKey::Zp,
            None,
            &[
                ("37221-3312", Some("37221")), // #20
                ("    37221", Some("37221")),  // #21
                ("SW1A1AA", Some("sw1a1aa")),  // #22
                ("-12345", None),              // #24
                ("1", None),                   // #24
                ("94105-1234", Some("94105")), // #63
            ],
        );
        check(
            HashedKey::Ct,
            None,
            &[
                ("    Menlo-Park  ", Some("menlopark")), // #25
                ("Coeur d'Alene", Some("coeurdalene")),  // #26
            ],
        );
        check(
            HashedKey::St,
            None,
            &[
                ("    C/a/lifo,rnia.  ", Some("ca")), // #29
                ("North Carolina", Some("nc")),       // #30
                ("  TE", Some("te")),                 // #31
            ],
        );
        check(
            HashedKey::Country,
            None,
            &[
                ("       United States       ", Some("us")), // #32
                ("G@B", Some("gb")),                         // #34
            ],
        );
        check(
            HashedKey::Fn,
            None,
            &[
                ("  Mary-Jane  O'Connor  ", Some("maryjaneoconnor")), // #36
                ("Müller", Some("müller")),                           // #37
                ("David#123", Some("david123")),                      // #38
            ],
        );
        check(HashedKey::Ln, None, &[("  Eg  ", Some("eg"))]); // #58
        check(
            HashedKey::ExternalId,
            None,
            &[
                ("USER-ID-456", Some("user-id-456")), // #39
                ("    12345", Some("12345")),         // #40
            ],
        );
        check(
            HashedKey::Ge,
            None,
            &[
                ("        Woman         ", Some("f")), // #41
                ("Boy", Some("m")),                    // #42
            ],
        );

        // #5 / #53 / #61: an already-hashed value is not hashed again.
        let a64 = "a".repeat(64);
        assert_eq!(sent(HashedKey::Em, &format!(" {a64} "), None), Some(a64));
        let hashed_phone = sha256_hex("11234567890");
        assert_eq!(
            sent(HashedKey::Ph, &hashed_phone, None),
            Some(hashed_phone.clone())
        );
        // #62: `+1 (415) 555-0100` hashes like `14155550100`.
        assert_eq!(
            sent(HashedKey::Ph, "+1 (415) 555-0100", None),
            sent(HashedKey::Ph, "14155550100", None)
        );
        assert!(sent(HashedKey::Ph, "14155550100", None).is_some());
        // #66: case variants of one email hash the same.
        let hashes: Vec<_> = ["A@b.com", "a@b.com", "A@B.COM"]
            .iter()
            .map(|raw| sent(HashedKey::Em, raw, None))
            .collect();
        assert!(hashes.iter().all(|h| h.is_some() && *h == hashes[0]));
    }

    #[test]
    fn sdk_test_vectors_where_we_deliberately_differ() {
        // #8 `01(650)123-4567` → SDK `16501234567` (it strips every leading zero). A `0` before
        // the US country code is no dialling form, and 650-123-xxxx is not a valid US number
        // (exchanges never start with 1): refused.
        assert!(normalized(HashedKey::Ph, "01(650)123-4567", Some("us")).is_err());
        assert!(normalized(HashedKey::Ph, "01(650)123-4567", None).is_err());
        // #10 `+1-555-123-4567 ext. 123` → SDK `15551234567123` (extension glued on). We drop
        // extensions, and area code 555 does not exist, so this one is refused.
        assert!(normalized(HashedKey::Ph, "+1-555-123-4567 ext. 123", None).is_err());
        // #11 `1-800-FLOWERS` → SDK `1800`. Vanity letters are not translated (a person's
        // number is never a vanity number); what is left is too short: refused.
        assert!(normalized(HashedKey::Ph, "1-800-FLOWERS", Some("us")).is_err());
        // #12 (`+86` given separately) is another API; a national number with the event's
        // country is covered by national_phone_numbers_take_the_events_country_code.
        // #13 `0000` → SDK `''` (dropped silently). It is not blank, so we refuse it and the
        // caller gets a warning.
        assert!(normalized(HashedKey::Ph, "0000", None).is_err());
        // §10.4: national numbers without a country code pass silently in every SDK
        // (`020 7946 0958` → `2079460958`); we complete them or refuse.
        assert!(normalized(HashedKey::Ph, "020 7946 0958", None).is_err());
        // §10.4: the trunk `(0)` is kept by every SDK (`4402079460958`); we remove it.
        assert_eq!(
            normalized(HashedKey::Ph, "+44 (0)20 7946 0958", None),
            Ok(Some("442079460958".to_owned()))
        );

        // #23 `A1 B2` → SDK `a1 b2` (keeps the space); Meta's docs say no spaces.
        assert_eq!(
            normalized(HashedKey::Zp, "A1 B2", None),
            Ok(Some("a1b2".to_owned()))
        );
        // #27 `Montréal` → SDK `montral` (drops non-ASCII letters); the docs allow UTF-8 and
        // Python keeps them (§11.5).
        assert_eq!(
            normalized(HashedKey::Ct, "Montréal", None),
            Ok(Some("montréal".to_owned()))
        );
        // #28 `123Angeles` → SDK refused (must start with a letter); we remove digits like
        // the rest of the punctuation.
        assert_eq!(
            normalized(HashedKey::Ct, "123Angeles", None),
            Ok(Some("angeles".to_owned()))
        );
        // #33 `U.K.` → SDK `uk`, which is not ISO 3166-1; Meta expects `gb`.
        assert_eq!(
            normalized(HashedKey::Country, "U.K.", None),
            Ok(Some("gb".to_owned()))
        );
        // #35 `unknown` → SDK `un` (truncation, no ISO check); refused.
        assert!(normalized(HashedKey::Country, "unknown", None).is_err());
        // #56 `"a b"@c.d` → Python SDK accepts it; §11.2 allows no internal whitespace.
        assert!(normalized(HashedKey::Em, "\"a b\"@c.d", None).is_err());
        // #57 external_id is sent raw by the Python SDK; §11.11 hashes it (lowercased).
        assert_eq!(
            sent(HashedKey::ExternalId, "123", None),
            Some(sha256_hex("123"))
        );
        // #60 MD5 passes through in the SDKs; see a_32_hex_md5_or_dashless_uuid_is_hashed.
    }

    // ---- Properties -------------------------------------------------------------------------

    fn any_key() -> impl Strategy<Value = HashedKey> {
        proptest::sample::select(HashedKey::ALL.to_vec())
    }

    fn any_country() -> impl Strategy<Value = Option<&'static str>> {
        proptest::sample::select(vec![
            None,
            Some("us"),
            Some("gb"),
            Some("br"),
            Some("de"),
            Some("it"),
            Some("zz"),
            Some("aq"),
        ])
    }

    /// Strings shaped like real input for `key`, so the properties also cover accepted values.
    fn plausible(key: HashedKey) -> BoxedStrategy<String> {
        let pattern = match key {
            HashedKey::Em => {
                "[ ]?[A-Za-z0-9._%+'-]{1,10}@[A-Za-z0-9-]{1,8}(\\.[a-zA-Z]{2,4}){1,2}[ ]?"
            }
            HashedKey::Ph => concat!(
                "(\\+1 ?\\(?(650|415|212|616)\\)? ?[2-9][0-9]{2}[-. ]?[0-9]{4}",
                "|1?[ -]?\\(?(650|415)\\)?[ -]?[2-9][0-9]{2}-?[0-9]{4}",
                "|\\(?(11|21|31)\\)? ?9[0-9]{4}-?[0-9]{4}",
                "|(\\+|00|)55 ?(11|21|31) ?9[0-9]{4} ?[0-9]{4}",
                "|0?7[4-9][0-9]{2} ?[0-9]{6}",
                "|\\+44 ?(\\(0\\))? ?(7[4-9][0-9]{2} ?[0-9]{6}|20 ?[378][0-9]{3} ?[0-9]{4})",
                "|\\+49 ?30 ?[0-9]{7,8}|\\+39 ?06 ?[0-9]{6,8}",
                "|[+0-9 ().-]{1,20})",
                "( (ext\\.?|x|#) ?[0-9]{1,4})?",
            ),
            HashedKey::Fn | HashedKey::Ln | HashedKey::Ct => {
                "[ ]?[\\p{L}\\p{M}][\\p{L}\\p{M}\\p{N}\\p{P} .'-]{0,20}"
            }
            HashedKey::St => concat!(
                "(California|north carolina|N\\.Y\\.|Québec|New  York|SP|",
                "[ ]?[\\p{L}\\p{M}][\\p{L}\\p{M}\\p{N}\\p{P} .'-]{0,20})",
            ),
            HashedKey::Zp => "[ ]?[A-Za-z0-9]{1,6}[ -]?[A-Za-z0-9]{0,5}",
            HashedKey::Country => concat!(
                "([A-Za-z]{2,3}|United States|U\\.K\\.|Brasil|Deutschland|England|",
                "South Korea|Türkiye|Côte d'Ivoire|México|[A-Za-z .]{4,20})",
            ),
            HashedKey::Db => concat!(
                "((19|20)[0-9]{2}[-/. ][01]?[0-9][-/. ][0-3]?[0-9]",
                "|[0-3]?[0-9][-/.–][01]?[0-9][-/.–](19|20)[0-9]{2}",
                "|(19|20)[0-9]{2}[01][0-9][0-3][0-9]",
                "|[01]?[0-9]月[0-3]?[0-9]日(19|20)[0-9]{2}年",
                "|(19|20)[0-9]{2}-[01][0-9]-[0-3][0-9]T[0-2][0-9]:[0-5][0-9]:[0-5][0-9]Z",
                "|[0-9]{1,4}[-/. –年月日]{1,2}[0-9]{1,2}[-/. –年月日]{1,2}[0-9]{1,4}[年日]?)",
            ),
            HashedKey::Ge => "(?i)(f|m|female|male|woman|man|mulher|homem|x)[. ]?",
            HashedKey::ExternalId => "[ ]?[\\PC]{1,30}[ ]?",
        };
        pattern.prop_map(|s| s).boxed()
    }

    fn assert_stable(
        key: HashedKey,
        raw: &str,
        country: Option<&str>,
    ) -> Result<(), TestCaseError> {
        let ctx = Context { country };
        let Ok(Some(first)) = prepare(key, raw, &ctx) else {
            return Ok(());
        };
        prop_assert_ne!(&first.sent, EMPTY_SHA256);
        prop_assert!(!first.sent.is_empty());
        // The sent value is a digest (or a parameter-builder value): it passes through.
        let again = prepare(key, &first.sent, &ctx);
        prop_assert_eq!(
            again,
            Ok(Some(Prepared {
                normalized: None,
                sent: first.sent.clone(),
            }))
        );
        if let Some(plain) = &first.normalized {
            prop_assert!(!plain.is_empty());
            prop_assert_eq!(&first.sent, &sha256_hex(plain));
            // E.164 digits without `+` are ambiguous once a country is known: `3906000000`
            // (Italy) is also a valid German national number. So phone output is fed back as
            // international: with its `+`, or as bare digits when no country is known.
            let feed_back = if key == HashedKey::Ph {
                vec![
                    (format!("+{plain}"), ctx),
                    (plain.clone(), Context::default()),
                ]
            } else {
                vec![(plain.clone(), ctx)]
            };
            for (input, ctx) in feed_back {
                let again = prepare(key, &input, &ctx);
                prop_assert_eq!(
                    again.map(|p| p.and_then(|p| p.normalized)),
                    Ok(Some(plain.clone())),
                    "{:?} {:?} normalized to {:?}",
                    key,
                    raw,
                    plain
                );
            }
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn prepare_never_panics_on_arbitrary_strings(
            key in any_key(),
            raw in any::<String>(),
            country in any_country(),
        ) {
            let _ = prepare(key, &raw, &Context { country });
        }

        #[test]
        fn prepare_is_idempotent_and_never_sends_the_empty_hash_on_arbitrary_strings(
            key in any_key(),
            raw in "\\PC{0,40}",
            country in any_country(),
        ) {
            assert_stable(key, &raw, country)?;
        }

        #[test]
        fn prepare_is_idempotent_on_plausible_values_for_every_key(
            (key, raw) in any_key().prop_flat_map(|key| (Just(key), plausible(key))),
            country in any_country(),
        ) {
            assert_stable(key, &raw, country)?;
        }

        #[test]
        fn country_code_never_panics_and_returns_two_lowercase_letters(raw in any::<String>()) {
            if let Some(code) = country_code(&raw) {
                prop_assert_eq!(code.len(), 2);
                prop_assert!(code.bytes().all(|b| b.is_ascii_lowercase()));
                prop_assert_eq!(country_code(code), Some(code));
            }
        }

        #[test]
        fn currency_code_never_panics_and_returns_three_uppercase_letters(raw in any::<String>()) {
            if let Some(code) = currency_code(&raw) {
                prop_assert_eq!(code.len(), 3);
                prop_assert!(code.bytes().all(|b| b.is_ascii_uppercase()));
            }
        }
    }
}
