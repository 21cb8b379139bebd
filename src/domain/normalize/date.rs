//! `db`, date of birth → `YYYYMMDD` (`meta-capi.md` §2.2, §11.9).

use unicode_normalization::UnicodeNormalization;

use super::{refuse, Refusal};

/// Oldest accepted year of birth (Meta: "1900–current").
const MIN_YEAR: u32 = 1900;
/// Newest accepted year of birth. Meta's upper bound is the current year, but this module is
/// pure and cannot read the clock, so a fixed far bound is used; callers that care about
/// future dates must check them against their own clock.
const MAX_YEAR: u32 = 2100;

/// Parses a date of birth written in one of the common orders and returns `YYYYMMDD`.
///
/// Accepted: `1997-02-16`, `19970216`, `2/16/1997`, `16-2-1997`, `16–2–1997` (any punctuation or
/// spaces between the parts), `12月31日1990年`, and ISO datetimes such as
/// `1997-02-16T00:00:00Z` (the written date is taken; no time zone shift). When the day and
/// month are both ≤ 12 the month comes first (`05-03-1995` → `19950503`), as in Meta's SDK;
/// a first part > 12 is the day (`16-2-1997`). The year must have four digits.
///
/// Month names (`December 31, 1990`) are deliberately not supported: they are refused, like
/// in Meta's parameter builder, rather than guessed in one language.
pub(super) fn date_of_birth(value: &str) -> Result<String, Refusal> {
    // NFKC turns full-width digits (`１９９７`) into ASCII ones.
    let text: String = value.nfkc().collect();
    let text = iso_datetime_date(&text).unwrap_or(&text);

    let mut groups: Vec<&str> = Vec::new();
    let mut start: Option<usize> = None;
    for (index, c) in text.char_indices() {
        if c.is_ascii_digit() {
            start.get_or_insert(index);
            continue;
        }
        if let Some(from) = start.take() {
            groups.push(text.get(from..index).unwrap_or_default());
        }
        if c.is_alphanumeric() && !matches!(c, '年' | '月' | '日') {
            return Err(refuse(
                "date of birth must be numeric (month names are not supported)",
            ));
        }
    }
    if let Some(from) = start {
        groups.push(text.get(from..).unwrap_or_default());
    }

    let (year, month, day) = match groups.as_slice() {
        [compact] if compact.len() == 8 => (
            number(compact.get(..4))?,
            number(compact.get(4..6))?,
            number(compact.get(6..))?,
        ),
        [first, second, third] => {
            if [first, second, third]
                .iter()
                .any(|g| g.len() > 4 || g.len() == 3)
            {
                return Err(refuse("not a date of birth"));
            }
            let (year, a, b) = match (first.len(), third.len()) {
                (4, 1..=2) if second.len() <= 2 => (first, second, third),
                (1..=2, 4) if second.len() <= 2 => (third, first, second),
                _ => {
                    return Err(refuse(
                        "date of birth needs exactly one four-digit year, first or last",
                    ))
                }
            };
            let (year, a, b) = (number(Some(year))?, number(Some(a))?, number(Some(b))?);
            // Month first unless the first part cannot be a month.
            if a > 12 && b <= 12 {
                (year, b, a)
            } else {
                (year, a, b)
            }
        }
        _ => return Err(refuse("not a date of birth")),
    };

    if !(MIN_YEAR..=MAX_YEAR).contains(&year) {
        return Err(refuse("year of birth out of range 1900-2100"));
    }
    if !(1..=12).contains(&month) || day < 1 || day > days_in_month(year, month) {
        return Err(refuse("not a calendar date"));
    }
    Ok(format!("{year:04}{month:02}{day:02}"))
}

/// The `YYYY-MM-DD` part of an ISO 8601 datetime (`1997-02-16T00:00:00Z`,
/// `1997-02-16 00:00:00.000+03:00`), or `None` when `text` is not one.
fn iso_datetime_date(text: &str) -> Option<&str> {
    let date = text.get(..10)?;
    let rest = text.get(10..)?;
    let bytes = date.as_bytes();
    let shape_ok = bytes.iter().enumerate().all(|(i, b)| match i {
        4 | 7 => *b == b'-',
        _ => b.is_ascii_digit(),
    });
    let mut rest_chars = rest.chars();
    let separator_ok = matches!(rest_chars.next(), Some('T' | 't' | ' '));
    let time_ok = rest.len() > 1
        && rest_chars.all(|c| {
            c.is_ascii_digit() || matches!(c, ':' | '.' | ',' | '+' | '-' | 'Z' | 'z' | ' ')
        });
    (shape_ok && separator_ok && time_ok).then_some(date)
}

fn number(digits: Option<&str>) -> Result<u32, Refusal> {
    digits
        .and_then(|d| d.parse().ok())
        .ok_or(refuse("not a date of birth"))
}

fn days_in_month(year: u32, month: u32) -> u32 {
    match month {
        2 if (year % 4 == 0 && year % 100 != 0) || year % 400 == 0 => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}
