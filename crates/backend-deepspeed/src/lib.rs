//! backend-deepspeed: placeholder, built in issue 6.
