//! The overview's bar chart: inline SVG drawn on the server (no script), three bars per time
//! bucket (accepted, delivered, dead), each with a `<title>` a pointer or screen reader can
//! read, and the same numbers in a table underneath for people who would rather read.

use maud::{html, Markup};

use crate::store::ActivityBucket;

const WIDTH: f64 = 720.0;
const HEIGHT: f64 = 200.0;
const LEFT: f64 = 40.0;
const RIGHT: f64 = 8.0;
const TOP: f64 = 12.0;
const BOTTOM: f64 = 28.0;

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

/// A chart of `buckets`; `label` names a bucket's start (`16:05`), `id` is unique on the page.
pub fn bars(
    id: &str,
    caption: &str,
    buckets: &[ActivityBucket],
    label: impl Fn(i64) -> String,
) -> Markup {
    let max = buckets
        .iter()
        .flat_map(|b| [b.accepted, b.delivered, b.dead])
        .max()
        .unwrap_or(0)
        .max(1);
    let plot_width = WIDTH - LEFT - RIGHT;
    let plot_height = HEIGHT - TOP - BOTTOM;
    let n = buckets.len().max(1) as f64;
    let group = plot_width / n;
    let bar = (group * 0.8 / 3.0).max(1.0);
    let height_of = |v: i64| v as f64 / max as f64 * plot_height;
    let [accepted, delivered, dead] = totals(buckets);
    let summary = format!("{caption}: {accepted} accepted, {delivered} delivered, {dead} dead");
    let title_id = format!("{id}-title");
    // Where the x-axis labels go: first, middle and last bucket.
    let ticks: Vec<usize> = match buckets.len() {
        0 => Vec::new(),
        1 => vec![0],
        len => vec![0, len / 2, len - 1],
    };
    html! {
        svg class="chart" viewBox=(format!("0 0 {WIDTH} {HEIGHT}")) role="img"
            aria-labelledby=(title_id) {
            title id=(title_id) { (summary) }
            // Gridlines at the top and the middle, labelled with their counts.
            @for (fraction, count) in [(1.0, max), (0.5, max / 2)] {
                @let y = TOP + plot_height * (1.0 - fraction);
                line class="grid" x1=(LEFT) x2=(WIDTH - RIGHT) y1=(y) y2=(y) {}
                text class="axis" x=(LEFT - 6.0) y=(y + 4.0) text-anchor="end" { (count) }
            }
            line class="baseline" x1=(LEFT) x2=(WIDTH - RIGHT) y1=(TOP + plot_height) y2=(TOP + plot_height) {}
            text class="axis" x=(LEFT - 6.0) y=(TOP + plot_height + 4.0) text-anchor="end" { "0" }
            @for (index, bucket) in buckets.iter().enumerate() {
                @let x0 = LEFT + group * index as f64 + group * 0.1;
                @for (series, (class, name)) in SERIES.iter().enumerate() {
                    @let v = value(bucket, series);
                    @let h = height_of(v);
                    rect class=(class) x=(x0 + bar * series as f64) y=(TOP + plot_height - h)
                        width=(bar) height=(h) {
                        title { (label(bucket.start)) ": " (v) " " (name) }
                    }
                }
            }
            @for index in ticks {
                @if let Some(bucket) = buckets.get(index) {
                    text class="axis" x=(LEFT + group * index as f64 + group / 2.0)
                        y=(HEIGHT - 8.0) text-anchor="middle" { (label(bucket.start)) }
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
        let plot = HEIGHT - TOP - BOTTOM;
        assert!(svg.contains(&format!("height=\"{plot}\"")), "{svg}");
        assert!(svg.contains(&format!("height=\"{}\"", plot / 2.0)), "{svg}");
        assert!(svg.contains("height=\"0\""), "{svg}");
        assert!(svg.contains("<title>t1: 1 dead</title>"), "{svg}");
        assert_eq!(totals(&buckets), [4, 2, 1]);
    }

    #[test]
    fn an_empty_chart_still_draws() {
        let svg = bars("day", "Last day", &[bucket(0, 0, 0, 0)], |_| "x".to_owned()).into_string();
        assert!(svg.contains("0 accepted, 0 delivered, 0 dead"));
    }
}
