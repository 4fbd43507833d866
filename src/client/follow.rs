//! `jobs follow`: a job's server-sent events until its terminal event, shown as progress bars and
//! stage lines (or one JSON object per event), reconnecting with `Last-Event-ID` when the stream
//! drops so no event is lost or shown twice.

use std::io::IsTerminal;
use std::time::Duration;

use eventsource_stream::Eventsource;
use futures::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};
use reqwest::header::ACCEPT;
use reqwest::Method;
use serde_json::Value;
use uuid::Uuid;

use super::Client;
use crate::error::{Error, Result};
use crate::events::{is_terminal, EventView};

/// Reconnections in a row without receiving an event before following gives up.
pub const MAX_RECONNECTS: u32 = 12;

/// First wait before reconnecting; doubled after each failure up to [`MAX_RECONNECT_WAIT`].
const FIRST_RECONNECT_WAIT: Duration = Duration::from_millis(250);
const MAX_RECONNECT_WAIT: Duration = Duration::from_secs(10);

/// How followed events are shown.
pub enum FollowView {
    /// A progress bar per stage and a line per stage, metric and log (a terminal).
    Bars(Option<ProgressBar>),
    /// A line per stage, metric, log and status change (a log file or pipe).
    Lines,
    /// Each event as one JSON object per line on stdout (scripts).
    Json,
}

impl FollowView {
    /// Bars on a terminal, else lines; JSON when asked.
    pub fn new(json: bool) -> Self {
        if json {
            Self::Json
        } else if std::io::stderr().is_terminal() {
            Self::Bars(None)
        } else {
            Self::Lines
        }
    }

    /// Shows one event.
    pub fn show(&mut self, event: &EventView) {
        match self {
            Self::Json => {
                if let Ok(line) = serde_json::to_string(event) {
                    println!("{line}");
                }
            }
            Self::Lines => {
                if let Some(line) = describe(event) {
                    println!("{line}");
                }
            }
            Self::Bars(bar) => show_bar(bar, event),
        }
    }

    /// Clears a bar still drawn.
    pub fn finish(&mut self) {
        if let Self::Bars(Some(bar)) = self {
            bar.finish_and_clear();
        }
    }
}

fn show_bar(bar: &mut Option<ProgressBar>, event: &EventView) {
    let payload = &event.payload;
    if event.event_type == "progress" {
        let bar = bar.get_or_insert_with(new_bar);
        let fraction = payload["fraction"].as_f64().unwrap_or(0.0).clamp(0.0, 1.0);
        bar.set_position((fraction * 1000.0).round() as u64);
        if let Some(message) = payload["message"].as_str() {
            bar.set_message(message.to_owned());
        }
        return;
    }
    if let Some(line) = describe(event) {
        match bar {
            Some(bar) => bar.println(line),
            None => eprintln!("{line}"),
        }
    }
    if is_terminal(&event.event_type) {
        if let Some(bar) = bar.take() {
            bar.finish_and_clear();
        }
    }
}

fn new_bar() -> ProgressBar {
    let bar = ProgressBar::new(1000);
    bar.set_style(
        ProgressStyle::with_template("{bar:40.cyan/blue} {percent:>3}% {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar
}

/// The line an event shows as, if any (progress has none: it is the bar).
pub fn describe(event: &EventView) -> Option<String> {
    let p = &event.payload;
    let text = |key: &str| p[key].as_str().unwrap_or_default().to_owned();
    let line = match event.event_type.as_str() {
        "queued" => "queued".to_owned(),
        "status" => format!("status: {}", text("status")),
        "stage_started" => format!(
            "▶ stage {}/{}: {}",
            p["index"].as_u64().map_or(0, |i| i + 1),
            p["stages"],
            text("stage")
        ),
        "stage_finished" => {
            let report = &p["report"];
            let mut line = format!("✓ stage {}", text("stage"));
            if let Some(secs) = report["wall_seconds"].as_f64() {
                line.push_str(&format!(" in {secs:.1} s"));
            }
            if let Some(met) = report["acceptance_met"].as_bool() {
                line.push_str(if met {
                    ", contract met"
                } else {
                    ", contract missed"
                });
            }
            line
        }
        "metric" => match p["step"].as_u64() {
            Some(step) => format!("  {} = {} (step {step})", text("name"), p["value"]),
            None => format!("  {} = {}", text("name"), p["value"]),
        },
        "log" => format!("  [{}] {}", text("level"), text("message")),
        "artifact" => format!("  artifact {}", text("name")),
        "cancel_requested" => "cancel requested".to_owned(),
        "succeeded" | "failed" | "cancelled" => {
            let mut line = format!("job {}", event.event_type);
            let reason = p["error"]["message"]
                .as_str()
                .or_else(|| p["message"].as_str())
                .unwrap_or_default();
            if !reason.is_empty() {
                line.push_str(&format!(": {reason}"));
            }
            line
        }
        "progress" => return None,
        other => format!("{other}: {p}"),
    };
    Some(line)
}

/// Follows `job`'s events after `after` until its terminal event; returns the job as the server
/// shows it then.
///
/// # Errors
/// [`Error::Unreachable`] after [`MAX_RECONNECTS`] failed reconnections in a row; the server's
/// refusal (an unknown job) at once.
pub async fn follow(
    client: &Client,
    job: Uuid,
    after: i64,
    view: &mut FollowView,
) -> Result<Value> {
    let path = format!("/v1/jobs/{job}/events");
    let mut last_seq = after;
    let mut failures = 0u32;
    let mut wait = FIRST_RECONNECT_WAIT;
    loop {
        let mut request = client
            .request(Method::GET, &path)
            .header(ACCEPT, "text/event-stream");
        if last_seq > 0 {
            request = request.header("last-event-id", last_seq.to_string());
        }
        let dropped = match client.send(request).await {
            Ok(response) => {
                let mut events = response.bytes_stream().eventsource();
                let mut dropped = None;
                while let Some(item) = events.next().await {
                    let event = match item {
                        Ok(event) => event,
                        Err(error) => {
                            dropped = Some(error.to_string());
                            break;
                        }
                    };
                    let Ok(event) = serde_json::from_str::<EventView>(&event.data) else {
                        continue; // not one of ours; a newer server's extra frame
                    };
                    last_seq = last_seq.max(event.seq);
                    failures = 0;
                    wait = FIRST_RECONNECT_WAIT;
                    view.show(&event);
                    if is_terminal(&event.event_type) {
                        view.finish();
                        return client
                            .call(Method::GET, &format!("/v1/jobs/{job}"), None)
                            .await;
                    }
                }
                dropped.unwrap_or_else(|| "the stream ended before the job did".to_owned())
            }
            Err(Error::Unreachable { message, .. }) => message,
            Err(refused) => {
                view.finish();
                return Err(refused);
            }
        };
        failures += 1;
        if failures > MAX_RECONNECTS {
            view.finish();
            return Err(Error::Unreachable {
                url: client.base().to_string(),
                message: format!(
                    "gave up following job {job} after {MAX_RECONNECTS} reconnections: {dropped}"
                ),
            });
        }
        tracing::debug!(%job, last_seq, %dropped, "event stream dropped; reconnecting");
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(MAX_RECONNECT_WAIT);
    }
}
