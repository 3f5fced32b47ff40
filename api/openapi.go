package api

import _ "embed" // for OpenAPI

// OpenAPI is the API's OpenAPI 3.1 document (openapi.json next to this file): every operation once,
// with its operationId, under paths relative to the two servers /api and /api/v1 (GET /health and
// GET /metrics under their own, the root), with their requests, answers and errors. The server
// serves it as-is at GET /api/openapi.json; tests hold the router and the server's answers to it,
// lint it with redocly and type-check a TypeScript client generated from it (openapi_test.go).
//
//go:embed openapi.json
var OpenAPI []byte
