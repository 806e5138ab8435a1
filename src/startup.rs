//! Building and running the application.
