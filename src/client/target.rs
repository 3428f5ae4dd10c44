//! What the user names on the command line before any request is made: the repository URL and
//! the API token. Both are validated offline so that a typo fails in milliseconds with a message
//! that says what to fix, and the token never reaches any output.

use std::fmt;

use url::Url;

/// A repository URL `http(s)://HOST[:PORT]/[prefix/]<repo>`, normalised to end in `/` so that
/// `join("api/v1/info")` stays below the repository.
#[derive(Clone, PartialEq, Eq)]
pub struct RepoUrl(Url);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TargetError {
    #[error("{0:?} is not a URL; pass the repository URL, e.g. https://cache.example.com/myrepo")]
    NotAUrl(String),
    #[error("{url:?} uses {scheme}:, but only http: and https: are supported")]
    Scheme { url: String, scheme: String },
    #[error("{0:?} names no repository; add its name to the path, e.g. {0}/myrepo")]
    NoRepository(String),
    #[error("{0:?} must not carry a query, fragment or credentials; pass the token with --token")]
    Extra(String),
}

impl RepoUrl {
    pub fn parse(text: &str) -> Result<Self, TargetError> {
        let trimmed = text.trim();
        let mut url = Url::parse(trimmed).map_err(|_| TargetError::NotAUrl(text.to_owned()))?;
        if url.scheme() != "http" && url.scheme() != "https" {
            return Err(TargetError::Scheme {
                url: text.to_owned(),
                scheme: url.scheme().to_owned(),
            });
        }
        if url.host_str().is_none_or(str::is_empty) {
            return Err(TargetError::NotAUrl(text.to_owned()));
        }
        if url.query().is_some()
            || url.fragment().is_some()
            || !url.username().is_empty()
            || url.password().is_some()
        {
            return Err(TargetError::Extra(redact_userinfo(trimmed)));
        }
        let has_repository = url
            .path_segments()
            .is_some_and(|mut segments| segments.any(|segment| !segment.is_empty()));
        if !has_repository {
            return Err(TargetError::NoRepository(
                trimmed.trim_end_matches('/').to_owned(),
            ));
        }
        if !url.path().ends_with('/') {
            let path = format!("{}/", url.path());
            url.set_path(&path);
        }
        Ok(Self(url))
    }

    /// The last path segment: the repository name as the server knows it.
    pub fn repository(&self) -> &str {
        self.0
            .path_segments()
            .and_then(|mut segments| segments.rfind(|s| !s.is_empty()))
            .unwrap_or_default()
    }

    /// `relative` resolved below the repository URL (`relative` must not start with `/`).
    pub fn join(&self, relative: &str) -> Url {
        self.0
            .join(relative)
            .expect("a relative path below a valid base URL")
    }

    pub fn as_url(&self) -> &Url {
        &self.0
    }
}

impl fmt::Display for RepoUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0.as_str().trim_end_matches('/'))
    }
}

impl fmt::Debug for RepoUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RepoUrl({self})")
    }
}

/// Credentials in a URL would end up in error messages: drop them before echoing it.
fn redact_userinfo(text: &str) -> String {
    match Url::parse(text) {
        Ok(mut url) => {
            let _ = url.set_username("");
            let _ = url.set_password(None);
            url.to_string()
        }
        Err(_) => "<the given URL>".to_owned(),
    }
}

/// An API token. Its `Debug` and `Display` never show the secret, so it can sit in any struct
/// that gets logged; [`Token::expose`] is the one way to the text, used for the header.
#[derive(Clone, PartialEq, Eq)]
pub struct Token(String);

const TOKEN_PREFIX: &str = "stx_live_";
const TOKEN_ID_LEN: usize = 26;
const TOKEN_SECRET_LEN: usize = 24;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    #[error("the token is empty; pass --token or set STOWIX_TOKEN")]
    Empty,
    #[error(
        "the token is malformed ({0}); a Stowix token looks like stx_live_<26 characters>_<24 characters>, \
         copy it again from `stowix admin token create`"
    )]
    Malformed(&'static str),
}

impl Token {
    /// Checks the shape `stx_live_<26 [a-z0-9]>_<24 [A-Za-z0-9]>` without echoing the value.
    pub fn parse(text: &str) -> Result<Self, TokenError> {
        let text = text.trim();
        if text.is_empty() {
            return Err(TokenError::Empty);
        }
        let rest = text
            .strip_prefix(TOKEN_PREFIX)
            .ok_or(TokenError::Malformed("it does not start with stx_live_"))?;
        let (id, secret) = rest.split_once('_').ok_or(TokenError::Malformed(
            "the part after stx_live_ has no `_` separator",
        ))?;
        if id.len() != TOKEN_ID_LEN
            || !id
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        {
            return Err(TokenError::Malformed(
                "its identifier is not 26 lowercase letters and digits",
            ));
        }
        if secret.len() != TOKEN_SECRET_LEN || !secret.bytes().all(|b| b.is_ascii_alphanumeric()) {
            return Err(TokenError::Malformed(
                "its secret is not 24 letters and digits",
            ));
        }
        Ok(Self(text.to_owned()))
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "stx_live_abcdefghijklmnopqrstuvwxy0_ABCDEFGHIJKLmnopqrstuv12";

    #[test]
    fn repo_url_normalises_and_names_the_repository() {
        let url = RepoUrl::parse("http://localhost:8080/main").unwrap();
        assert_eq!(url.repository(), "main");
        assert_eq!(
            url.join("api/v1/info").as_str(),
            "http://localhost:8080/main/api/v1/info"
        );
        assert_eq!(url.to_string(), "http://localhost:8080/main");
        let prefixed = RepoUrl::parse("https://example.com/caches/team/").unwrap();
        assert_eq!(prefixed.repository(), "team");
        assert_eq!(
            prefixed.join("api/v1/presence").as_str(),
            "https://example.com/caches/team/api/v1/presence"
        );
    }

    #[test]
    fn repo_url_rejections_say_what_is_wrong() {
        assert!(matches!(
            RepoUrl::parse("localhost/main"),
            Err(TargetError::NotAUrl(_))
        ));
        assert!(matches!(
            RepoUrl::parse("not a url"),
            Err(TargetError::NotAUrl(_))
        ));
        assert!(matches!(
            RepoUrl::parse("ftp://h/main"),
            Err(TargetError::Scheme { .. })
        ));
        assert_eq!(
            RepoUrl::parse("http://h:1/"),
            Err(TargetError::NoRepository("http://h:1".into()))
        );
        assert!(matches!(
            RepoUrl::parse("http://h/r?x=1"),
            Err(TargetError::Extra(_))
        ));
        let with_credentials = RepoUrl::parse("http://user:hunter2@h/r").unwrap_err();
        assert!(!with_credentials.to_string().contains("hunter2"));
    }

    #[test]
    fn token_format_is_checked_without_echoing_it() {
        assert!(Token::parse(GOOD).is_ok());
        assert_eq!(
            format!("{:?}", Token::parse(GOOD).unwrap()),
            "Token(<redacted>)"
        );
        for bad in [
            "",
            "stx_test_abcdefghijklmnopqrstuvwxy0_ABCDEFGHIJKLmnopqrstuv12",
            "stx_live_abcdefghijklmnopqrstuvwxy0ABCDEFGHIJKLmnopqrstuv12",
            "stx_live_ABCDEFGHIJKLMNOPQRSTUVWXY0_ABCDEFGHIJKLmnopqrstuv12",
            "stx_live_abcdefghijklmnopqrstuvwxy0_ABCDEFGHIJKLmnopqrstuv1",
            "stx_live_abcdefghijklmnopqrstuvwxy0_ABCDEFGHIJKLmnopqrstu-12",
        ] {
            let err = Token::parse(bad).unwrap_err();
            if !bad.is_empty() {
                assert!(!err.to_string().contains(&bad[9..]), "{err}");
            }
        }
    }
}
