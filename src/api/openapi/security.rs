//! The access part of the contract: the bearer-key security scheme on every `/v1` operation, and
//! the answers access control can give on any of them (401, 403, 429).

use utoipa::openapi::path::Operation;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme};
use utoipa::openapi::{ContentBuilder, Ref, ResponseBuilder};
use utoipa::Modify;

/// The security scheme's name in the document.
pub const BEARER: &str = "api_key";

/// Adds the scheme and, to every `/v1` operation, its requirement and the access answers.
pub struct AccessDoc;

impl Modify for AccessDoc {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        if let Some(components) = openapi.components.as_mut() {
            components.add_security_scheme(
                BEARER,
                SecurityScheme::Http(
                    HttpBuilder::new()
                        .scheme(HttpAuthScheme::Bearer)
                        .bearer_format("cpd_<id>_<secret>")
                        .description(Some(
                            "An API key from `compressd keys create`. Not needed while the server \
                             runs without auth (no keys, or `auth = \"none\"`).",
                        ))
                        .build(),
                ),
            );
        }
        for (path, item) in openapi.paths.paths.iter_mut() {
            if !path.starts_with("/v1/") {
                continue;
            }
            for operation in [&mut item.get, &mut item.post, &mut item.delete]
                .into_iter()
                .flatten()
            {
                add_access(operation);
            }
        }
    }
}

fn add_access(operation: &mut Operation) {
    operation.security = Some(vec![SecurityRequirement::new(BEARER, Vec::<String>::new())]);
    let answers = [
        ("401", "No API key, or an unknown or revoked one"),
        ("403", "The API key lacks the scope (`read`, `write`, `admin`) this needs"),
        ("429", "Over the key's request rate (`Retry-After` says when to retry) or, creating a job, the tenant's job quota"),
    ];
    for (status, description) in answers {
        let problem = ResponseBuilder::new()
            .description(description)
            .content(
                "application/problem+json",
                ContentBuilder::new()
                    .schema(Some(Ref::from_schema_name("Problem")))
                    .build(),
            )
            .build();
        operation
            .responses
            .responses
            .entry(status.to_owned())
            .or_insert(problem.into());
    }
}
