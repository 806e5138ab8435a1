//! Client-side request budgets per RapidPro throttle scope.
