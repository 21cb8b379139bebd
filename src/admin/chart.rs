//! The overview's bar chart: inline SVG drawn on the server (no script), three bars per time
//! bucket (accepted, delivered, dead), each with a `<title>` a pointer or screen reader can
//! read, and the same numbers in a table underneath for people who would rather read.

use maud::{html, Markup};

use crate::store::ActivityBucket;

/// The drawing's own units; the SVG stretches to the page's width and a fixed height, so the
/// labels are HTML beside it (text inside a stretched SVG would be distorted or, on a phone,
/// tiny).
const WIDTH: f64 = 720.0;
const HEIGHT: f64 = 200.0;

/// The three series, in drawing order: CSS class and label.
const SERIES: [(&str, &str); 3] = [
    ("accepted", "accepted"),
    ("delivered", "delivered"),
    ("dead", "dead"),
];

fn value(bucket: &ActivityBucket, series: usize) -> i64 {
    match series {
        0 => bucket.accepted,
        1 => bucket.delivered,
        _ => bucket.dead,
    }
}

/// Sums of each series over the buckets.
pub fn totals(buckets: &[ActivityBucket]) -> [i64; 3] {
    let mut sums = [0; 3];
    for bucket in buckets {
        for (series, sum) in sums.iter_mut().enumerate() {
            *sum += value(bucket, series);
        }
    }
    sums
}

/// The scale's top: the largest count rounded up to an even number (at least 2), so the middle
/// gridline is a whole count.
fn scale_top(buckets: &[ActivityBucket]) -> i64 {
    let max = buckets
        .iter()
        .flat_map(|b| [b.accepted, b.delivered, b.dead])
        .max()
        .unwrap_or(0);
    (max + max % 2).max(2)
}

/// A chart of `buckets`; `label` names a bucket's start (`16:05`), `id` is unique on the page.
pub fn bars(
    id: &str,
    caption: &str,
    buckets: &[ActivityBucket],
    label: impl Fn(i64) -> String,
) -> Markup {
    let top = scale_top(buckets);
    let n = buckets.len().max(1) as f64;
    let group = WIDTH / n;
    let bar = group * 0.8 / 3.0;
    let height_of = |v: i64| v as f64 / top as f64 * HEIGHT;
    let [accepted, delivered, dead] = totals(buckets);
    let summary = format!("{caption}: {accepted} accepted, {delivered} delivered, {dead} dead");
    let title_id = format!("{id}-title");
    html! {
        div class="chart" {
            div class="y-axis" aria-hidden="true" {
                span class="y-top" { (top) }
                span class="y-mid" { (top / 2) }
                span class="y-zero" { "0" }
            }
            svg viewBox=(format!("0 0 {WIDTH} {HEIGHT}")) preserveAspectRatio="none" role="img"
                aria-labelledby=(title_id) {
                title id=(title_id) { (summary) }
                @for y in [0.5, HEIGHT / 2.0] {
                    line class="grid" x1="0" x2=(WIDTH) y1=(y) y2=(y) vector-effect="non-scaling-stroke" {}
                }
                @for (index, bucket) in buckets.iter().enumerate() {
                    @let x0 = group * index as f64 + group * 0.1;
                    @for (series, (class, name)) in SERIES.iter().enumerate() {
                        @let v = value(bucket, series);
                        @let h = height_of(v);
                        rect class=(class) x=(x0 + bar * series as f64) y=(HEIGHT - h)
                            width=(bar) height=(h) {
                            title { (label(bucket.start)) ": " (v) " " (name) }
                        }
                    }
                }
                line class="baseline" x1="0" x2=(WIDTH) y1=(HEIGHT - 0.5) y2=(HEIGHT - 0.5) vector-effect="non-scaling-stroke" {}
            }
            div class="x-axis" aria-hidden="true" {
                @if let (Some(first), Some(middle)) = (buckets.first(), buckets.get(buckets.len() / 2)) {
                    span { (label(first.start)) }
                    span { (label(middle.start)) }
                    span { "now" }
                }
            }
        }
    }
}

/// The chart's numbers as a table (inside a `<details>` on the page).
pub fn table(caption: &str, buckets: &[ActivityBucket], label: impl Fn(i64) -> String) -> Markup {
    html! {
        table {
            caption { (caption) }
            thead { tr { th scope="col" { "From" } th scope="col" class="num" { "Accepted" }
                th scope="col" class="num" { "Delivered" } th scope="col" class="num" { "Dead" } } }
            tbody {
                @for bucket in buckets {
                    tr {
                        th scope="row" { (label(bucket.start)) }
                        td class="num" { (bucket.accepted) }
                        td class="num" { (bucket.delivered) }
                        td class="num" { (bucket.dead) }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bucket(start: i64, accepted: i64, delivered: i64, dead: i64) -> ActivityBucket {
        ActivityBucket {
            start,
            accepted,
            delivered,
            dead,
        }
    }

    #[test]
    fn bars_scale_to_the_largest_count_and_say_what_they_show() {
        let buckets = [bucket(0, 4, 2, 0), bucket(1, 0, 0, 1)];
        let svg = bars("hour", "Last hour", &buckets, |start| format!("t{start}")).into_string();
        assert!(
            svg.contains("Last hour: 4 accepted, 2 delivered, 1 dead"),
            "{svg}"
        );
        // The tallest bar fills the plot, half of it is half as tall, zero is flat.
        assert!(svg.contains(&format!("height=\"{HEIGHT}\"")), "{svg}");
        assert!(
            svg.contains(&format!("height=\"{}\"", HEIGHT / 2.0)),
            "{svg}"
        );
        assert!(svg.contains("<span class=\"y-top\">4</span>"), "{svg}");
        assert!(svg.contains("<span class=\"y-mid\">2</span>"), "{svg}");
        assert!(svg.contains("height=\"0\""), "{svg}");
        assert!(svg.contains("<title>t1: 1 dead</title>"), "{svg}");
        assert_eq!(totals(&buckets), [4, 2, 1]);
    }

    #[test]
    fn the_scale_is_even_so_the_middle_line_is_a_whole_count() {
        assert_eq!(scale_top(&[bucket(0, 3, 1, 0)]), 4);
        assert_eq!(scale_top(&[bucket(0, 0, 0, 0)]), 2);
        assert_eq!(scale_top(&[bucket(0, 1, 0, 0)]), 2);
        assert_eq!(scale_top(&[bucket(0, 0, 10, 0)]), 10);
    }

    #[test]
    fn an_empty_chart_still_draws() {
        let svg = bars("day", "Last day", &[bucket(0, 0, 0, 0)], |_| "x".to_owned()).into_string();
        assert!(svg.contains("0 accepted, 0 delivered, 0 dead"));
    }
}
