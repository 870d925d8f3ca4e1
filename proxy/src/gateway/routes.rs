//! The route table, built once from the `google.api.http` annotations in the
//! compiled descriptor set: every annotated method of every service, with its
//! `additional_bindings`. No route is written by hand.

use http::Method;
use prost_reflect::{DescriptorPool, MethodDescriptor, Value};
use trellis_proto::google::api::HttpRule;
use trellis_proto::google::api::http_rule::Pattern;

use super::template::{PathError, Template};

#[derive(Debug, Clone)]
pub struct Route {
    /// The route's index in [`RouteTable::routes`].
    pub id: usize,
    pub http_method: Method,
    pub template: Template,
    /// `None`: no body. `Some("*")`: every field not in the path.
    /// `Some(field)`: that top-level field.
    pub body: Option<String>,
    pub response_body: Option<String>,
    pub method: MethodDescriptor,
    /// `/package.Service/Method`.
    pub grpc_path: String,
}

#[derive(Debug)]
pub enum Lookup<'a> {
    Found(&'a Route, Vec<(String, String)>),
    /// The path exists for other methods; these are allowed.
    MethodNotAllowed(Vec<Method>),
    NotFound,
    /// The path fits this route's template, but a value in it is unusable.
    BadPath(&'a Route, PathError),
}

/// Which API a listener serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    /// The data services (on `listen.grpc` and `listen.http`).
    Data,
    /// The admin service (on `listen.admin`).
    Admin,
    /// Both (the data doors with `listen.admin_on_data_doors`).
    All,
}

impl Api {
    /// Does this API include the service `full_name`?
    pub fn serves(self, full_name: &str) -> bool {
        match self {
            Api::Data => crate::dataplane::DATA_SERVICES.contains(&full_name),
            Api::Admin => full_name == "trellis.admin.v1.Admin",
            Api::All => Api::Data.serves(full_name) || Api::Admin.serves(full_name),
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct RouteTable {
    routes: Vec<Route>,
}

impl RouteTable {
    /// Every annotated method in `pool`. Fails on a malformed annotation
    /// (a bug in the protos, found at start-up).
    pub fn from_pool(pool: &DescriptorPool) -> Result<Self, String> {
        let Some(ext) = pool.get_extension_by_name("google.api.http") else {
            return Ok(RouteTable::default());
        };
        let mut routes = Vec::new();
        for service in pool.services() {
            for method in service.methods() {
                let options = method.options();
                if !options.has_extension(&ext) {
                    continue;
                }
                let Value::Message(m) = options.get_extension(&ext).into_owned() else {
                    continue;
                };
                let rule: HttpRule = m.transcode_to().map_err(|e| {
                    format!("{}: bad google.api.http option: {e}", method.full_name())
                })?;
                let grpc_path = format!("/{}/{}", service.full_name(), method.name());
                let mut rules = vec![rule.clone()];
                rules.extend(rule.additional_bindings.iter().cloned());
                for r in rules {
                    let (verb, path) = match r.pattern {
                        Some(Pattern::Get(p)) => (Method::GET, p),
                        Some(Pattern::Put(p)) => (Method::PUT, p),
                        Some(Pattern::Post(p)) => (Method::POST, p),
                        Some(Pattern::Delete(p)) => (Method::DELETE, p),
                        Some(Pattern::Patch(p)) => (Method::PATCH, p),
                        Some(Pattern::Custom(c)) => (
                            Method::from_bytes(c.kind.as_bytes()).map_err(|e| {
                                format!("{}: custom verb {:?}: {e}", method.full_name(), c.kind)
                            })?,
                            c.path,
                        ),
                        None => continue,
                    };
                    let template = Template::parse(&path)
                        .map_err(|e| format!("{}: {e}", method.full_name()))?;
                    routes.push(Route {
                        id: 0,
                        http_method: verb,
                        template,
                        body: (!r.body.is_empty()).then_some(r.body),
                        response_body: (!r.response_body.is_empty()).then_some(r.response_body),
                        method: method.clone(),
                        grpc_path: grpc_path.clone(),
                    });
                }
            }
        }
        // Most specific first: a verb, then more literal segments, then no `**`.
        routes.sort_by_key(|r| std::cmp::Reverse(r.template.specificity()));
        for (i, r) in routes.iter_mut().enumerate() {
            r.id = i;
        }
        Ok(RouteTable { routes })
    }

    /// Only the routes of `api`'s services: each listener serves (and
    /// documents) its own.
    pub fn only(mut self, api: Api) -> Self {
        self.routes
            .retain(|r| api.serves(r.method.parent_service().full_name()));
        for (i, r) in self.routes.iter_mut().enumerate() {
            r.id = i;
        }
        self
    }

    pub fn routes(&self) -> &[Route] {
        &self.routes
    }

    /// The route for `method` on `path`, or why there is none. A path that
    /// fits a template with a verb (`/v1/patterns/{name}:restart`) is that
    /// verb's resource alone: the verbless templates it also fits (`{name}`
    /// would bind `mem:restart`) neither take it nor count in `Allow`.
    pub fn find(&self, method: &Method, path: &str) -> Lookup<'_> {
        let mut allowed = Vec::new();
        let mut path_error = None;
        let mut verb_matched = false;
        for r in &self.routes {
            // Routes are sorted verb-first, so a verb match is seen before
            // any verbless one.
            if verb_matched && r.template.verb.is_none() {
                break;
            }
            let matched = r.template.matches(path);
            if r.template.verb.is_some() && !matches!(matched, Ok(None)) {
                verb_matched = true;
            }
            match matched {
                Ok(Some(bindings)) => {
                    if r.http_method == *method {
                        return Lookup::Found(r, bindings);
                    }
                    if !allowed.contains(&r.http_method) {
                        allowed.push(r.http_method.clone());
                    }
                }
                Ok(None) => {}
                Err(e) => {
                    if r.http_method == *method && path_error.is_none() {
                        path_error = Some((r, e));
                    }
                }
            }
        }
        if let Some((r, e)) = path_error {
            return Lookup::BadPath(r, e);
        }
        if allowed.is_empty() {
            Lookup::NotFound
        } else {
            Lookup::MethodNotAllowed(allowed)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> RouteTable {
        let pool = DescriptorPool::decode(trellis_proto::FILE_DESCRIPTOR_SET).unwrap();
        RouteTable::from_pool(&pool).unwrap()
    }

    #[test]
    fn every_annotated_method_has_a_route() {
        let t = table();
        let paths: Vec<&str> = t.routes().iter().map(|r| r.grpc_path.as_str()).collect();
        for want in [
            "/trellis.data.v1.KeyValue/Get",
            "/trellis.data.v1.KeyValue/Put",
            "/trellis.data.v1.KeyValue/Delete",
            "/trellis.data.v1.KeyValue/List",
            "/trellis.admin.v1.Admin/ListPatterns",
            "/trellis.admin.v1.Admin/GetPattern",
            "/trellis.admin.v1.Admin/WatchPatterns",
        ] {
            assert!(paths.contains(&want), "{want} missing: {paths:?}");
        }
        assert!(
            !paths.iter().any(|p| p.contains("Lifecycle")),
            "no route to the pattern protocol"
        );
    }

    #[test]
    fn each_api_has_only_its_own_routes() {
        let data = table().only(Api::Data);
        assert!(
            data.routes()
                .iter()
                .all(|r| r.grpc_path.starts_with("/trellis.data.v1."))
        );
        assert!(matches!(
            data.find(&Method::POST, "/v1/patterns/mem:restart"),
            Lookup::NotFound
        ));
        let admin = table().only(Api::Admin);
        assert!(
            admin
                .routes()
                .iter()
                .all(|r| r.grpc_path.starts_with("/trellis.admin.v1.Admin/"))
        );
        assert!(matches!(
            admin.find(&Method::GET, "/v1/namespaces/d/keys/k"),
            Lookup::NotFound
        ));
        assert_eq!(
            data.routes().len() + admin.routes().len(),
            table().routes().len()
        );
        for (i, r) in admin.routes().iter().enumerate() {
            assert_eq!(r.id, i, "ids index the table");
        }
    }

    #[test]
    fn lookup_by_method_and_path() {
        let t = table();
        match t.find(&Method::PUT, "/v1/namespaces/default/keys/a/b") {
            Lookup::Found(r, b) => {
                assert_eq!(r.grpc_path, "/trellis.data.v1.KeyValue/Put");
                assert_eq!(r.body.as_deref(), Some("*"));
                assert_eq!(b[1], ("key".to_string(), "a/b".to_string()));
            }
            other => panic!("{other:?}"),
        }
        match t.find(&Method::POST, "/v1/namespaces/default/keys/a") {
            Lookup::MethodNotAllowed(allow) => {
                assert!(
                    allow.contains(&Method::GET)
                        && allow.contains(&Method::PUT)
                        && allow.contains(&Method::DELETE)
                );
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            t.find(&Method::GET, "/v2/nothing"),
            Lookup::NotFound
        ));
        // The verb's resource is the verb's alone: no GetPattern of
        // "mem:restart" in Allow, nor a Put of the key "" under `…/keys`.
        for (method, path, allow) in [
            (Method::GET, "/v1/patterns/mem:restart", vec![Method::POST]),
            (
                Method::OPTIONS,
                "/v1/patterns/mem:start",
                vec![Method::POST],
            ),
            (Method::PUT, "/v1/namespaces/n/keys", vec![Method::GET]),
            (
                Method::PUT,
                "/v1/namespaces/n/topics/t:publish",
                vec![Method::POST],
            ),
        ] {
            match t.find(&method, path) {
                Lookup::MethodNotAllowed(got) => assert_eq!(got, allow, "{method} {path}"),
                other => panic!("{method} {path}: {other:?}"),
            }
        }
        match t.find(&Method::GET, "/v1/patterns/mem:restarts") {
            Lookup::Found(r, b) => {
                assert_eq!(r.grpc_path, "/trellis.admin.v1.Admin/GetPattern");
                assert_eq!(b, vec![("name".to_string(), "mem:restarts".to_string())]);
            }
            other => panic!("{other:?}"),
        }
        match t.find(&Method::GET, "/v1/patterns:watch") {
            Lookup::Found(r, _) => assert_eq!(r.grpc_path, "/trellis.admin.v1.Admin/WatchPatterns"),
            other => panic!("{other:?}"),
        }
        match t.find(&Method::POST, "/v1/patterns/mem:restart") {
            Lookup::Found(r, b) => {
                assert_eq!(r.grpc_path, "/trellis.admin.v1.Admin/RestartPattern");
                assert_eq!(b, vec![("name".to_string(), "mem".to_string())]);
            }
            other => panic!("{other:?}"),
        }
    }
}
