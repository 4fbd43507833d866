//! `GET /ui`: the web dashboard, static files compiled into the binary (`ui/` at the repository
//! root: plain HTML, CSS and ES modules, no build step, nothing loaded from elsewhere).
//!
//! The pages need no key; the scripts call `/v1` with the key the user enters, so the dashboard
//! sees exactly what that key may see. A strict Content-Security-Policy keeps every script, style
//! and connection on this origin.

use axum::extract::Path;
use axum::http::header::{
    CACHE_CONTROL, CONTENT_SECURITY_POLICY, CONTENT_TYPE, X_CONTENT_TYPE_OPTIONS,
};
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

use super::error::{ApiError, Problem};

/// One embedded file.
struct Asset {
    name: &'static str,
    content_type: &'static str,
    body: &'static str,
}

macro_rules! asset {
    ($name:literal, $content_type:literal) => {
        Asset {
            name: $name,
            content_type: $content_type,
            body: include_str!(concat!("../../ui/", $name)),
        }
    };
}

/// Every file of the dashboard; `index.html` is the page, the rest it loads.
const ASSETS: &[Asset] = &[
    asset!("index.html", "text/html; charset=utf-8"),
    asset!("style.css", "text/css; charset=utf-8"),
    asset!("app.js", "text/javascript; charset=utf-8"),
    asset!("api.js", "text/javascript; charset=utf-8"),
    asset!("dom.js", "text/javascript; charset=utf-8"),
    asset!("charts.js", "text/javascript; charset=utf-8"),
    asset!("jobs.js", "text/javascript; charset=utf-8"),
    asset!("job.js", "text/javascript; charset=utf-8"),
    asset!("new_job.js", "text/javascript; charset=utf-8"),
    asset!("compare.js", "text/javascript; charset=utf-8"),
    asset!("register.js", "text/javascript; charset=utf-8"),
];

/// Scripts, styles, fetches and images from this origin only (downloads are `blob:` URLs made by
/// the page); no inline script or style, no framing.
const POLICY: &str = "default-src 'self'; img-src 'self' data: blob:; object-src 'none'; \
                      base-uri 'none'; form-action 'self'; frame-ancestors 'none'";

/// The dashboard page (every view is a `#/…` fragment of it).
#[utoipa::path(get, path = "/ui", tag = "operations",
    responses((status = 200, description = "The web dashboard's page", content_type = "text/html", body = String)))]
pub async fn ui_index() -> Response {
    serve(&ASSETS[0])
}

/// A file of the dashboard (`app.js`, `style.css`, …).
#[utoipa::path(get, path = "/ui/{asset}", tag = "operations",
    params(("asset" = String, Path, description = "File name, e.g. `app.js`")),
    responses(
        (status = 200, description = "The file", content_type = "text/javascript", body = String),
        (status = 404, description = "No such file", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn ui_asset(Path(name): Path<String>) -> Result<Response, ApiError> {
    ASSETS
        .iter()
        .find(|asset| asset.name == name)
        .map(serve)
        .ok_or_else(|| ApiError::route_not_found(&format!("/ui/{name}")))
}

fn serve(asset: &Asset) -> Response {
    (
        StatusCode::OK,
        [
            (CONTENT_TYPE, HeaderValue::from_static(asset.content_type)),
            (CONTENT_SECURITY_POLICY, HeaderValue::from_static(POLICY)),
            (X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff")),
            // Small files that change with the binary: revalidate rather than run stale code.
            (CACHE_CONTROL, HeaderValue::from_static("no-cache")),
        ],
        asset.body,
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every module a script imports is served, so no page breaks on a missing file.
    #[test]
    fn every_imported_module_is_embedded() {
        for asset in ASSETS.iter().filter(|a| a.name.ends_with(".js")) {
            for line in asset.body.lines().filter(|l| l.starts_with("import ")) {
                let target = line
                    .split(['\'', '"'])
                    .nth(1)
                    .and_then(|path| path.strip_prefix("./"))
                    .unwrap_or_else(|| panic!("{}: import not relative: {line}", asset.name));
                assert!(
                    ASSETS.iter().any(|a| a.name == target),
                    "{} imports {target}, which is not embedded",
                    asset.name
                );
            }
        }
    }
}
