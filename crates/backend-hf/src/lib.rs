//! backend-hf: placeholder, built in issue 6.
