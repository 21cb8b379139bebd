//! Where the person lives: `country`, `st` (state) and `zp` (postal code) (`meta-capi.md`
//! §2.2, §11.6–§11.8).

use std::str::FromStr;

use super::{fold_to_ascii_letters, letters_and_digits, refuse, Refusal};

/// Maps a country code, name or alias to a lowercase ISO 3166-1 alpha-2 code.
///
/// The ISO list, the alpha-3 codes and the English names and common English aliases
/// ("UnitedKingdom", "America", "England", "Russia", …) come from the `celes` crate; only the
/// aliases it lacks are listed in [`alias`]. Lookup ignores case, accents, spaces and
/// punctuation (`U.K.`, `G@B`, `United States`, `Türkiye` all work).
pub(super) fn country_code(raw: &str) -> Option<&'static str> {
    let key = fold_to_ascii_letters(raw);
    // Longest English name in the table is under 50 letters; anything longer is not a country.
    if key.is_empty() || key.len() > 64 || !key.is_ascii() {
        return None;
    }
    if let Some(code) = alias(&key) {
        return Some(code);
    }
    // `from_str` knows codes, names and most aliases; a few aliases (`Türkiye`, `East Timor`,
    // `North Macedonia`) are only in `from_alias`, which must come second because it maps
    // `samoa` to American Samoa.
    let country = celes::Country::from_str(&key)
        .or_else(|_| celes::Country::from_alias(&key))
        .ok()?;
    // celes also lists Kosovo as XK / XKX, a user-assigned code that is not part of ISO 3166-1.
    if country.alpha2.eq_ignore_ascii_case("xk") {
        return None;
    }
    lowercase_alpha2(country.alpha2)
}

/// Aliases that `celes` does not know: ISO-adjacent abbreviations, the countries of the United
/// Kingdom it misses, and the Portuguese and Spanish names our (mostly Brazilian) users type.
/// Keys are ASCII letters only, as produced by [`fold_to_ascii_letters`].
fn alias(key: &str) -> Option<&'static str> {
    ALIASES
        .iter()
        .find(|(names, _)| names.contains(&key))
        .map(|(_, code)| *code)
}

const ALIASES: &[(&[&str], &str)] = &[
    // United Kingdom: `UK` is only "exceptionally reserved" in ISO 3166-1; Meta wants `gb`.
    (
        &[
            "uk",
            "britain",
            "wales",
            "reinounido",
            "inglaterra",
            "escocia",
            "galles",
            "paisdegales",
            "irlandadonorte",
            "granbretana",
            "graobretanha",
        ],
        "gb",
    ),
    // United States (Portuguese EUA, Spanish EE.UU.).
    (
        &[
            "eua",
            "eeuu",
            "estadosunidos",
            "estadosunidosdaamerica",
            "estadosunidosdeamerica",
        ],
        "us",
    ),
    // "Korea" alone is taken to mean South Korea, as almost every form means it.
    (
        &["korea", "corea", "coreia", "coreiadosul", "coreadelsur"],
        "kr",
    ),
    (
        &["uae", "emiradosarabesunidos", "emiratosarabesunidos"],
        "ae",
    ),
    (&["brasil"], "br"),
    (&["deutschland", "alemanha", "alemania"], "de"),
    (&["espana", "espanha"], "es"),
    (&["franca", "francia"], "fr"),
    (&["italia"], "it"),
    (&["japao", "japon"], "jp"),
    (
        &["holanda", "paisesbaixos", "paisesbajos", "nederland"],
        "nl",
    ),
    (&["suica", "suiza", "schweiz", "suisse", "svizzera"], "ch"),
    (&["osterreich"], "at"),
    (&["uruguai"], "uy"),
    (&["paraguai"], "py"),
    (&["equador"], "ec"),
    (&["africadosul", "sudafrica"], "za"),
    (&["novazelandia", "nuevazelanda"], "nz"),
    (&["irlanda"], "ie"),
    (&["belgica"], "be"),
    (&["grecia"], "gr"),
    (&["suecia"], "se"),
    (&["noruega"], "no"),
    (&["dinamarca"], "dk"),
    (&["finlandia"], "fi"),
    (&["polonia", "polska"], "pl"),
    (&["turquia"], "tr"),
    (&["egito", "egipto"], "eg"),
    (&["marrocos", "marruecos"], "ma"),
    (&["mocambique"], "mz"),
    (&["ucrania"], "ua"),
    (&["romenia", "rumania"], "ro"),
    (&["hungria"], "hu"),
    (&["croacia"], "hr"),
    (&["rusia"], "ru"),
    (&["costadomarfim", "costademarfil"], "ci"),
    (&["guinebissau"], "gw"),
    (&["saotomeeprincipe"], "st"),
];

/// Every pair of lowercase ASCII letters, `aaabac…zz`, so that a lowercase alpha-2 code can be
/// handed out as `&'static str` without a hand-written copy of the ISO list.
static LETTER_PAIRS: [u8; 26 * 26 * 2] = letter_pairs();

const fn letter_pairs() -> [u8; 26 * 26 * 2] {
    let mut out = [0u8; 26 * 26 * 2];
    let mut i = 0;
    while i < 26 * 26 {
        out[2 * i] = b'a' + (i / 26) as u8;
        out[2 * i + 1] = b'a' + (i % 26) as u8;
        i += 1;
    }
    out
}

fn lowercase_alpha2(code: &str) -> Option<&'static str> {
    let [first, second] = <[u8; 2]>::try_from(code.as_bytes()).ok()?;
    let (first, second) = (first.to_ascii_lowercase(), second.to_ascii_lowercase());
    if !first.is_ascii_lowercase() || !second.is_ascii_lowercase() {
        return None;
    }
    let index = 2 * (usize::from(first - b'a') * 26 + usize::from(second - b'a'));
    std::str::from_utf8(LETTER_PAIRS.get(index..index + 2)?).ok()
}

/// `st`: US states and Canadian provinces by name → their 2-letter code; anything else keeps
/// its letters (any script) only.
pub(super) fn state(value: &str) -> Result<String, Refusal> {
    let letters = letters_and_digits(value, false);
    if letters.is_empty() {
        return Err(refuse("state has no letters"));
    }
    let key = fold_to_ascii_letters(&letters);
    Ok(match us_or_canadian_region(&key) {
        Some(code) => code.to_owned(),
        None => letters,
    })
}

/// US states, DC and inhabited territories (FIPS / USPS codes), and Canadian provinces and
/// territories (Canada Post codes), keyed by name without spaces or accents.
fn us_or_canadian_region(key: &str) -> Option<&'static str> {
    let code = match key {
        "alabama" => "al",
        "alaska" => "ak",
        "arizona" => "az",
        "arkansas" => "ar",
        "california" => "ca",
        "colorado" => "co",
        "connecticut" => "ct",
        "delaware" => "de",
        "districtofcolumbia" | "washingtondc" => "dc",
        "florida" => "fl",
        "georgia" => "ga",
        "hawaii" => "hi",
        "idaho" => "id",
        "illinois" => "il",
        "indiana" => "in",
        "iowa" => "ia",
        "kansas" => "ks",
        "kentucky" => "ky",
        "louisiana" => "la",
        "maine" => "me",
        "maryland" => "md",
        "massachusetts" => "ma",
        "michigan" => "mi",
        "minnesota" => "mn",
        "mississippi" => "ms",
        "missouri" => "mo",
        "montana" => "mt",
        "nebraska" => "ne",
        "nevada" => "nv",
        "newhampshire" => "nh",
        "newjersey" => "nj",
        "newmexico" => "nm",
        "newyork" => "ny",
        "northcarolina" => "nc",
        "northdakota" => "nd",
        "ohio" => "oh",
        "oklahoma" => "ok",
        "oregon" => "or",
        "pennsylvania" => "pa",
        "rhodeisland" => "ri",
        "southcarolina" => "sc",
        "southdakota" => "sd",
        "tennessee" => "tn",
        "texas" => "tx",
        "utah" => "ut",
        "vermont" => "vt",
        "virginia" => "va",
        "washington" => "wa",
        "westvirginia" => "wv",
        "wisconsin" => "wi",
        "wyoming" => "wy",
        "americansamoa" => "as",
        "guam" => "gu",
        "northernmarianaislands" => "mp",
        "puertorico" => "pr",
        "usvirginislands" | "unitedstatesvirginislands" => "vi",
        "alberta" => "ab",
        "britishcolumbia" => "bc",
        "manitoba" => "mb",
        "newbrunswick" => "nb",
        "newfoundlandandlabrador" | "newfoundland" => "nl",
        "northwestterritories" => "nt",
        "novascotia" => "ns",
        "nunavut" => "nu",
        "ontario" => "on",
        "princeedwardisland" => "pe",
        "quebec" => "qc",
        "saskatchewan" => "sk",
        "yukon" | "yukonterritory" => "yt",
        _ => return None,
    };
    Some(code)
}

/// `zp`: lowercase, no spaces, ASCII letters and digits only. A US ZIP+4 keeps its first five
/// digits.
pub(super) fn postal_code(value: &str) -> Result<String, Refusal> {
    let compact: String = value
        .chars()
        .filter(|c| !c.is_whitespace())
        .flat_map(char::to_lowercase)
        .collect();
    // A postal code starts with a letter or digit; `-12345` is a mangled value, not a postcode.
    if !compact.starts_with(|c: char| c.is_ascii_alphanumeric()) {
        return Err(refuse("not a postal code"));
    }
    if compact
        .chars()
        .any(|c| c.is_alphanumeric() && !c.is_ascii_alphanumeric())
    {
        return Err(refuse(
            "postal code has characters other than latin letters and digits",
        ));
    }
    let cleaned: String = compact
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .collect();
    // US ZIP (`12345`) or ZIP+4 (`12345-6789`, `123456789`): Meta wants the first 5 digits.
    // Deciding on the cleaned form (not only on `^\d{5}(-?\d{4})?$`) keeps this idempotent:
    // nine digits written any other way are treated as a ZIP+4 too.
    let all_digits = cleaned.bytes().all(|b| b.is_ascii_digit());
    if all_digits && cleaned.len() == 9 {
        return Ok(cleaned.chars().take(5).collect());
    }
    if cleaned.len() < 2 {
        return Err(refuse("postal code is too short"));
    }
    Ok(cleaned)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_two_letter_key_maps_to_itself_or_nothing_unless_it_is_an_alias() {
        // Guards against celes mapping a 2-letter input to a different country by alias.
        for a in b'a'..=b'z' {
            for b in b'a'..=b'z' {
                let key = String::from_utf8(vec![a, b]).unwrap_or_default();
                if alias(&key).is_some() {
                    continue;
                }
                if let Some(code) = country_code(&key) {
                    assert_eq!(code, key, "{key} maps to {code}");
                }
            }
        }
    }

    #[test]
    fn the_iso_list_has_the_249_assigned_alpha2_codes() {
        let mut count = 0;
        for a in b'a'..=b'z' {
            for b in b'a'..=b'z' {
                let key = String::from_utf8(vec![a, b]).unwrap_or_default();
                if alias(&key).is_none() && country_code(&key).is_some() {
                    count += 1;
                }
            }
        }
        assert_eq!(count, 249);
    }

    #[test]
    fn every_alias_maps_to_a_real_iso_code() {
        for (names, code) in ALIASES {
            // The code itself must be a real ISO code (looked up without the alias table).
            let iso = celes::Country::from_alpha2(code).map(|c| c.alpha2);
            assert_eq!(iso.map(str::to_ascii_lowercase).as_deref(), Ok(*code));
            for name in *names {
                assert_eq!(country_code(name), Some(*code), "{name}");
                assert!(name.bytes().all(|b| b.is_ascii_lowercase()), "{name}");
            }
        }
    }

    #[test]
    fn lowercase_alpha2_rejects_non_letters() {
        assert_eq!(lowercase_alpha2("GB"), Some("gb"));
        assert_eq!(lowercase_alpha2("zz"), Some("zz"));
        assert_eq!(lowercase_alpha2("G1"), None);
        assert_eq!(lowercase_alpha2("GBR"), None);
        assert_eq!(lowercase_alpha2("é"), None);
    }
}
