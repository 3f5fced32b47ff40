package api

import _ "embed" // for OpenAPI

// OpenAPI is the API's OpenAPI 3.1 document (openapi.json next to this file): every route under
// /api and /api/v1, GET /health and GET /metrics, with their requests, answers and errors. The
// server serves it as-is at GET /api/openapi.json; tests hold the router and the server's answers
// to it.
//
//go:embed openapi.json
var OpenAPI []byte
