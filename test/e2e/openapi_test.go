package e2e

import (
	"fmt"
	"net/http"
	"os"

	"github.com/sandboxd/sandboxd/api"
	"github.com/sandboxd/sandboxd/internal/openapitest"
)

// openAPICheck holds every response the tests receive to api/openapi.json (status, content type,
// headers, JSON body; streams and downloads are not read): the helpers use http.DefaultClient.
var openAPICheck *openapitest.Transport

// checkResponses installs the check; TestMain calls it before the tests.
func checkResponses() {
	c, err := openapitest.New(api.OpenAPI)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	openAPICheck = &openapitest.Transport{Checker: c, Report: func(err error) {
		fmt.Fprintf(os.Stderr, "response disagrees with api/openapi.json: %v\n", err)
	}}
	http.DefaultClient.Transport = openAPICheck
}

// responsesChecked sums the check up after the tests: any mismatch fails the run.
func responsesChecked(code int) int {
	failures, n := openAPICheck.Failures()
	if len(failures) > 0 {
		fmt.Fprintf(os.Stderr, "FAIL: %d of %d responses disagree with api/openapi.json:\n", len(failures), n)
		for _, f := range failures {
			fmt.Fprintf(os.Stderr, "  %v\n", f)
		}
		return max(code, 1)
	}
	fmt.Fprintf(os.Stderr, "%d responses agree with api/openapi.json\n", n)
	return code
}
