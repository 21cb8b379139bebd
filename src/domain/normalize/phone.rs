//! `ph`, phone number → E.164 digits without `+` (`meta-capi.md` §2.2, §11.3), validated with
//! the `phonenumber` crate (libphonenumber metadata).

use phonenumber::country::Id;
use unicode_normalization::UnicodeNormalization;

use super::{refuse, Refusal};

/// E.164 allows at most 15 digits (Meta's SDKs allow 16; we keep the standard).
const MAX_DIGITS: usize = 15;
/// Meta's SDKs refuse fewer than 7 digits; no real international number is shorter.
const MIN_DIGITS: usize = 7;

const NOT_VALID: Refusal = refuse("not a valid phone number");
const NO_COUNTRY_CODE: Refusal =
    refuse("phone number has no country code; set the event's country or DEFAULT_COUNTRY");

/// Normalizes a phone number to E.164 digits without `+`.
///
/// - Extensions (`ext. 123`, `x123`, `#123`, `;ext=123`, or any letters after the number) are
///   dropped: only the main number is hashed. Vanity numbers (`1-800-FLOWERS`) therefore lose
///   their letters and are refused as invalid.
/// - A trunk `(0)` (`+44 (0)20 …`) is removed.
/// - `+` or `00` in front means international; otherwise the number is read as a national
///   number of `country` (the event's or the default country), then, failing that, as an
///   international number whose `+` was left out.
pub(super) fn phone(value: &str, country: Option<&str>) -> Result<String, Refusal> {
    // NFKC turns full-width digits and `＋` into ASCII.
    let text: String = value.nfkc().collect();
    let main = without_trunk_zero(main_number(&text));

    let plus = main
        .chars()
        .take_while(|c| !c.is_ascii_digit())
        .any(|c| c == '+');
    let all_digits: String = main.chars().filter(char::is_ascii_digit).collect();
    let mut digits = all_digits.clone();
    let mut international = plus;
    if let Some(rest) = all_digits.strip_prefix("00") {
        // `0044 …`, and the redundant `+00 …` / `+001 …`.
        digits = rest.to_owned();
        international = true;
    }

    if digits.is_empty() {
        return Err(refuse("phone number has no digits"));
    }
    // A national number may carry a trunk or international dialling prefix on top of its
    // 15 digits (`011 55 11 98765 4321`); the E.164 result is checked again in checked_e164.
    let limit = if international {
        MAX_DIGITS
    } else {
        MAX_DIGITS + 4
    };
    if digits.len() > limit {
        return Err(refuse("phone number has more than 15 digits"));
    }
    if international && digits.len() < MIN_DIGITS {
        return Err(refuse("phone number has fewer than 7 digits"));
    }

    let with_plus = format!("+{digits}");
    if international {
        return international_e164(&with_plus)
            // An international dialling prefix longer than `00` (Australia's `0011`).
            .or_else(|| {
                let region = region(country).filter(|_| !plus)?;
                national_e164(region, &all_digits)
            })
            .ok_or(NOT_VALID);
    }
    match region(country) {
        Some(region) => national_e164(region, &digits)
            // The caller included the country code but not the `+` (`5511987654321`).
            .or_else(|| international_e164(&with_plus))
            .ok_or(NOT_VALID),
        None => international_e164(&with_plus).ok_or(NO_COUNTRY_CODE),
    }
}

/// The part of `text` before an extension: the first letter, `#`, `;`, `,` or `~` that comes
/// after a digit starts the extension. Letters before any digit (`tel:`, `Phone`) stay and are
/// stripped later with the rest of the punctuation.
fn main_number(text: &str) -> &str {
    let mut seen_digit = false;
    for (index, c) in text.char_indices() {
        if c.is_ascii_digit() {
            seen_digit = true;
        } else if seen_digit && (c.is_alphabetic() || matches!(c, '#' | ';' | ',' | '~')) {
            return text.get(..index).unwrap_or(text);
        }
    }
    text
}

/// Removes every `(0)` (spaces allowed inside the parentheses): the trunk prefix that UK and
/// other numbers show after the country code, `+44 (0)20 7946 0958`.
fn without_trunk_zero(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(open) = rest.find('(') {
        let (before, from_paren) = rest.split_at(open);
        out.push_str(before);
        let inner = from_paren.get(1..).unwrap_or_default();
        let trimmed = inner.trim_start();
        let after_zero = trimmed.strip_prefix('0').map(str::trim_start);
        match after_zero.and_then(|s| s.strip_prefix(')')) {
            Some(after) => rest = after,
            None => {
                out.push('(');
                rest = inner;
            }
        }
    }
    out.push_str(rest);
    out
}

/// A phonenumber region and its calling code.
#[derive(Clone, Copy)]
struct Region {
    id: Id,
    calling_code: u16,
}

/// The phonenumber region for a country (`us` → `Id::US`, 1), when its metadata exists.
fn region(country: Option<&str>) -> Option<Region> {
    let code = super::country_code(country?)?.to_ascii_uppercase();
    // The parser unwraps the region's metadata; only hand it regions that have some.
    let metadata = phonenumber::metadata::DATABASE.by_id(code.as_str())?;
    Some(Region {
        id: code.parse().ok()?,
        calling_code: metadata.country_code(),
    })
}

/// Reads `digits` as a national number of `region` (which may also start with the region's
/// international dialling prefix, e.g. `011` from the US).
fn national_e164(region: Region, digits: &str) -> Option<String> {
    let number = phonenumber::parse(Some(region.id), digits).ok()?;
    let found = number.code().value();
    if found == region.calling_code {
        return checked_e164(&number);
    }
    // The digits dialled abroad (`011 55 11 …`). The crate then strips the *default* region's
    // national prefix from the foreign number (`+55 11 9…` came out as `+55 9…`), so the part
    // after the dialling prefix is read again as an international number.
    let found = found.to_string();
    (1..=4)
        .filter_map(|skip| digits.get(skip..))
        .filter(|rest| rest.starts_with(found.as_str()))
        .find_map(|rest| international_e164(&format!("+{rest}")))
}

/// Parses an international `text` (`+…`) and returns its E.164 digits if the number is valid.
fn international_e164(text: &str) -> Option<String> {
    checked_e164(&phonenumber::parse(None, text).ok()?)
}

/// The E.164 digits of `number` when it is valid and 7 to 15 digits long.
fn checked_e164(number: &phonenumber::PhoneNumber) -> Option<String> {
    if !phonenumber::is_valid(number) {
        return None;
    }
    // Built by hand: the crate's E.164 formatter returns a fmt::Error (and `to_string` would
    // panic) for country codes missing from its metadata.
    let e164 = format!("{}{}", number.code().value(), number.national());
    let ok = (MIN_DIGITS..=MAX_DIGITS).contains(&e164.len())
        && e164.bytes().all(|b| b.is_ascii_digit())
        && !e164.starts_with('0');
    ok.then_some(e164)
}
