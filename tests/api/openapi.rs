//! `openapi.yaml` at the repository root must equal what the code generates.
//!
//! Regenerate it with `cargo run -- openapi > openapi.yaml`, or run this test with
//! `COMPRESSD_UPDATE_OPENAPI=1` to rewrite it.

use std::path::Path;

#[test]
fn openapi_yaml_matches_the_code() {
    let generated = compressd::api::openapi::yaml();
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("openapi.yaml");
    if std::env::var_os("COMPRESSD_UPDATE_OPENAPI").is_some() {
        std::fs::write(&path, &generated).expect("write openapi.yaml");
        return;
    }
    let stored = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        stored == generated,
        "openapi.yaml is stale: regenerate it with `cargo run -- openapi > openapi.yaml` \
         (or COMPRESSD_UPDATE_OPENAPI=1 cargo test --test api openapi::)"
    );
}

#[test]
fn the_contract_documents_every_job_route_and_problem_bodies() {
    let document = serde_json::to_value(compressd::api::openapi::document()).unwrap();
    for (path, method) in [
        ("/v1/jobs", "post"),
        ("/v1/jobs", "get"),
        ("/v1/jobs/{id}", "get"),
        ("/v1/jobs/{id}", "delete"),
        ("/v1/jobs/{id}/cancel", "post"),
        ("/healthz", "get"),
        ("/readyz", "get"),
        ("/metrics", "get"),
    ] {
        assert!(
            document["paths"][path][method].is_object(),
            "{method} {path} is undocumented"
        );
    }
    let create = &document["paths"]["/v1/jobs"]["post"]["responses"]["422"]["content"]
        ["application/problem+json"];
    assert!(create["schema"].is_object(), "422 documents a problem body");
    assert!(document["components"]["schemas"]["Problem"]["properties"]["pointer"].is_object());
}
